//! The descriptions of a leaf and of a hub node, as read from TOML.
//!
//! Plain strings where nats-server takes strings (addresses, sizes), so
//! the file says what the server will see; [`super::check`] decides what
//! is acceptable.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// A site's leaf nats-server: JetStream domain `leaf-<site>`, holding all
/// of the site's durable state, linked to the hub when [`Leaf::hub`] is set.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Leaf {
    /// The site id; the JetStream domain is `leaf-<site>`.
    pub site: String,
    /// Server name; default `leaf-<site>`. It must be unique among every
    /// server the hub sees, and MQTT needs one.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client listen address. Loopback by default: the daemon runs on the
    /// same host.
    #[serde(default = "default_client_listen")]
    pub listen: String,
    /// TLS on the client port: what the daemons connect to
    /// (`[nats.tls]` in their config).
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// HTTP monitoring port, always bound to 127.0.0.1 (`/healthz`,
    /// `/jsz`, `/leafz` are not for the open network). 0: any free port,
    /// chosen by nats-server (see `ports_file_dir`).
    #[serde(default = "default_monitor_port")]
    pub monitor_port: u16,
    /// Where nats-server writes the client and monitoring URLs it listens
    /// on (`nats-server_<pid>.ports`): how a harness learns the ports of
    /// listeners given port `-1` (any free port: client, leafnode, MQTT)
    /// or `monitor_port = 0`, without picking ports that something else
    /// may take first.
    #[serde(default)]
    pub ports_file_dir: Option<PathBuf>,
    /// Log file; default: the server logs to stderr (the journal).
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// Where JetStream keeps its files and how much it may use.
    pub jetstream: JetStream,
    /// The link to the hub; absent, the site runs on its own.
    #[serde(default)]
    pub hub: Option<HubLink>,
    /// The leaf's own MQTT listener (sensors can publish to the leaf
    /// directly, without a separate broker).
    #[serde(default)]
    pub mqtt: Option<Mqtt>,
    /// File included at top level, typically the `authorization` block
    /// `presenced acl` prints. Relative to the rendered config's directory:
    /// nats-server resolves includes there.
    #[serde(default)]
    pub authorization_include: Option<PathBuf>,
}

/// JetStream storage of a server.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JetStream {
    /// Where streams are stored; must survive reboots.
    pub store_dir: PathBuf,
    /// Upper bound of memory storage (`max_mem`), e.g. `256M`.
    #[serde(default)]
    pub max_memory: Option<String>,
    /// Upper bound of file storage (`max_file`), e.g. `20G`.
    #[serde(default)]
    pub max_file: Option<String>,
    /// How often stored writes are fsynced: `always`, a duration such as
    /// `1s`, or `server-default` (nats-server's own, 2 minutes). JetStream
    /// acknowledges before it syncs, so on power loss a host loses up to
    /// one interval of acknowledged writes. See docs/PERFORMANCE.md.
    #[serde(default)]
    pub sync_interval: SyncInterval,
}

/// JetStream's `sync_interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncInterval {
    /// fsync before every acknowledgement: nothing acknowledged is lost on
    /// power loss, at a large cost in write rate.
    Always,
    /// fsync at this interval: at most this much acknowledged data is lost
    /// on power loss.
    Every(Duration),
    /// Leave nats-server's default (2 minutes).
    ServerDefault,
}

/// The edge default: an edge host loses power without warning, and a
/// one-second window costs little write rate (docs/PERFORMANCE.md has the
/// figures) while bounding the loss to about one second of writes.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

impl Default for SyncInterval {
    fn default() -> Self {
        SyncInterval::Every(DEFAULT_SYNC_INTERVAL)
    }
}

impl std::str::FromStr for SyncInterval {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(SyncInterval::Always),
            "server-default" => Ok(SyncInterval::ServerDefault),
            other => humantime::parse_duration(other)
                .map(SyncInterval::Every)
                .map_err(|e| {
                    format!(
                        "{other:?} is not `always`, `server-default` or a duration such as `1s` ({e})"
                    )
                }),
        }
    }
}

impl std::fmt::Display for SyncInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncInterval::Always => f.write_str("always"),
            SyncInterval::ServerDefault => f.write_str("server-default"),
            SyncInterval::Every(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl<'de> Deserialize<'de> for SyncInterval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for SyncInterval {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// The leaf's link to the hub cluster.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HubLink {
    /// Leafnode URLs of the hub nodes (`nats-leaf://host:7422`); list all
    /// of them so the link survives the loss of any one node.
    pub urls: Vec<String>,
    /// File holding `nkey: "SU..."`, included into the remote: the seed the
    /// leaf authenticates to the hub with. A file, so that the seed stays
    /// out of the rendered config (and out of the Nix store). Relative to
    /// the rendered config's directory, like every include.
    #[serde(default)]
    pub nkey_include: Option<PathBuf>,
    /// A NATS credentials file (JWT and seed), for hubs run with
    /// decentralised auth.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// How long the leaf waits between attempts to re-establish a lost link.
    /// Short: a link that comes back early lets the hub catch up early.
    #[serde(default = "default_reconnect", with = "humantime_serde")]
    pub reconnect: Duration,
    /// TLS on the link: the hub's CA, and the site's certificate when the
    /// hub verifies leaves.
    #[serde(default)]
    pub tls: Option<LinkTls>,
}

/// TLS of a listener (client port or leafnode listener).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// The server's certificate (PEM); its names must cover every host
    /// name clients dial.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// CA that signs the clients' certificates; needed with `verify`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Require a client certificate signed by `ca_file`.
    #[serde(default)]
    pub verify: bool,
    /// TLS handshake timeout.
    #[serde(default = "default_tls_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// TLS of the leaf's outgoing link to the hub.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinkTls {
    /// CA that signs the hub's certificates; default: the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The site's certificate, for a hub that verifies leaves.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// An MQTT listener.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    /// Listen address, e.g. `127.0.0.1:1883`.
    pub listen: String,
}

/// One node of the hub cluster: JetStream domain `hub`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HubNode {
    /// This node's server name, unique in the cluster.
    pub server_name: String,
    /// Client listen address (admin tools, `presenced provision-hub`).
    #[serde(default = "default_client_listen")]
    pub listen: String,
    /// TLS on the client port.
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// HTTP monitoring port, always bound to 127.0.0.1. 0: any free
    /// port, chosen by nats-server (see `ports_file_dir`).
    #[serde(default = "default_monitor_port")]
    pub monitor_port: u16,
    /// As [`Leaf::ports_file_dir`].
    #[serde(default)]
    pub ports_file_dir: Option<PathBuf>,
    /// As [`Leaf::log_file`].
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// As [`Leaf::jetstream`].
    pub jetstream: JetStream,
    /// Routes to the other nodes; absent, a single-node hub (a lab setup:
    /// the hub mirrors then cannot be replicated three times).
    #[serde(default)]
    pub cluster: Option<Cluster>,
    /// Where the sites' leaf nodes connect.
    #[serde(default)]
    pub leafnodes: LeafListen,
    /// File included at top level, e.g. the hub's `authorization` block;
    /// relative to the rendered config's directory.
    #[serde(default)]
    pub authorization_include: Option<PathBuf>,
}

/// The route mesh between hub nodes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Cluster name, the same on every node.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// Route listen address of this node.
    pub listen: String,
    /// Route URLs of the other nodes (`nats-route://host:6222`).
    pub routes: Vec<String>,
}

/// The hub's leafnode listener.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LeafListen {
    /// Listen address for the sites' leafnode connections.
    #[serde(default = "default_leaf_listen")]
    pub listen: String,
    /// Do not tell leaves the other nodes' leafnode addresses, so a leaf
    /// only dials the URLs it lists: for nodes reached through addresses
    /// they do not know themselves (NAT, a relay).
    #[serde(default)]
    pub no_advertise: bool,
    /// TLS for the sites' links; with `verify`, a leaf must present a
    /// certificate signed by `ca_file`.
    #[serde(default)]
    pub tls: Option<ServerTls>,
}

impl Default for LeafListen {
    fn default() -> Self {
        LeafListen {
            listen: default_leaf_listen(),
            no_advertise: false,
            tls: None,
        }
    }
}

fn default_client_listen() -> String {
    "127.0.0.1:4222".to_owned()
}
fn default_monitor_port() -> u16 {
    8222
}
fn default_reconnect() -> Duration {
    Duration::from_secs(1)
}
fn default_tls_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_cluster_name() -> String {
    "presenced-hub".to_owned()
}
fn default_leaf_listen() -> String {
    "0.0.0.0:7422".to_owned()
}

impl Leaf {
    /// A leaf of `site` storing into `store_dir`, everything else default.
    pub fn new(site: &crate::naming::Site, store_dir: PathBuf) -> Leaf {
        Leaf {
            site: site.as_str().to_owned(),
            server_name: None,
            listen: default_client_listen(),
            tls: None,
            monitor_port: default_monitor_port(),
            ports_file_dir: None,
            log_file: None,
            jetstream: JetStream::new(store_dir),
            hub: None,
            mqtt: None,
            authorization_include: None,
        }
    }

    /// The server name, default `leaf-<site>`.
    pub fn server_name(&self) -> String {
        self.server_name.clone().unwrap_or_else(|| {
            crate::naming::Site::new(&self.site)
                .map(|site| site.leaf_domain())
                .unwrap_or_else(|_| self.site.clone())
        })
    }
}

impl JetStream {
    pub fn new(store_dir: PathBuf) -> JetStream {
        JetStream {
            store_dir,
            max_memory: None,
            max_file: None,
            sync_interval: SyncInterval::default(),
        }
    }
}

impl HubLink {
    pub fn new(urls: Vec<String>) -> HubLink {
        HubLink {
            urls,
            nkey_include: None,
            credentials: None,
            reconnect: default_reconnect(),
            tls: None,
        }
    }
}

impl HubNode {
    /// A single hub node named `server_name`, everything else default.
    pub fn new(server_name: &str, store_dir: PathBuf) -> HubNode {
        HubNode {
            server_name: server_name.to_owned(),
            listen: default_client_listen(),
            tls: None,
            monitor_port: default_monitor_port(),
            ports_file_dir: None,
            log_file: None,
            jetstream: JetStream::new(store_dir),
            cluster: None,
            leafnodes: LeafListen::default(),
            authorization_include: None,
        }
    }
}
