//! What the sandbox runs, decided before anything starts: ports,
//! directories, names and the daemon configs. Pure: the ports come from the
//! caller, so tests pin them and the shell asks the kernel for free ones.

use crate::config::{Config, ConfigError};
use crate::naming::Site;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The site config every simulated site runs, with its zones and evidence.
pub const EXAMPLE_CONFIG: &str = include_str!("../../examples/sandbox.toml");

/// The MQTT source of the example config that reads the leaf's listener.
pub const MQTT_SOURCE: &str = "leaf";

/// Topic root of the simulated devices: `sandbox/<room>/<kind>`. The leaf's
/// MQTT listener maps it to NATS subjects `sandbox.<room>.<kind>`.
pub const DEVICE_TOPIC_ROOT: &str = "sandbox";

/// Nodes of the hub cluster: three, the smallest that keeps R3 streams
/// writable with one node down.
pub const HUB_NODES: usize = 3;

/// Name of the service (identity) running ingest and engine on each site.
pub const SERVICE: &str = "presenced";
/// The operator's identity: may send commands (`presenced cmd`) and read
/// what it commands, nothing else.
pub const OPERATOR: &str = "operator";

/// MQTT user the simulator publishes as.
pub const SIMULATOR_MQTT_USER: &str = "simulator";
/// MQTT user the daemon reads the leaf's listener as.
pub const DAEMON_MQTT_USER: &str = "presenced";

/// How many sites, and where everything goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub sites: usize,
    /// Absolute.
    pub dir: PathBuf,
}

/// One hub node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubNodePlan {
    pub name: String,
    pub client_port: u16,
    pub monitor_port: u16,
    pub cluster_port: u16,
    pub leafnode_port: u16,
    pub store_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_file: PathBuf,
    /// The hub's `authorization` block, beside the config (nats-server
    /// resolves includes against the config's directory).
    pub authorization_path: PathBuf,
}

impl HubNodePlan {
    pub fn client_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }
    pub fn leafnode_url(&self) -> String {
        format!("nats-leaf://127.0.0.1:{}", self.leafnode_port)
    }
    pub fn route_url(&self) -> String {
        format!("nats-route://127.0.0.1:{}", self.cluster_port)
    }
    pub fn monitor_addr(&self) -> SocketAddr {
        loopback(self.monitor_port)
    }
}

/// One site's leaf nats-server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafPlan {
    pub server_name: String,
    pub client_port: u16,
    pub monitor_port: u16,
    pub mqtt_port: u16,
    pub store_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_file: PathBuf,
    /// The `authorization` block generated from the site's access file.
    pub authorization_path: PathBuf,
    /// `nkey: "SU..."`: the seed the leaf authenticates to the hub with;
    /// beside the config, like every include.
    pub hub_nkey_include: PathBuf,
}

impl LeafPlan {
    pub fn client_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }
    pub fn monitor_addr(&self) -> SocketAddr {
        loopback(self.monitor_port)
    }
}

/// One site's identities (seed files) and access map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteKeys {
    pub service_seed: PathBuf,
    /// The operator's seed (`presenced cmd`, `get`, `watch` by hand).
    pub operator_seed: PathBuf,
    pub leafnode_seed: PathBuf,
    pub access_file: PathBuf,
    /// MQTT passwords, one file per user (0600).
    pub simulator_password: PathBuf,
    pub daemon_mqtt_password: PathBuf,
}

/// One site: leaf, daemon, identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SitePlan {
    pub site: Site,
    pub dir: PathBuf,
    pub leaf: LeafPlan,
    pub keys: SiteKeys,
    pub http_port: u16,
    /// The daemon's config (service identity).
    pub daemon_config: PathBuf,
    pub daemon_log: PathBuf,
    /// The same site config with the admin identity: provisioning and
    /// `watch`/`get` by hand.
    pub admin_config: PathBuf,
    /// The admin config pointing at the hub: reading the site's mirrors.
    pub hub_admin_config: PathBuf,
    /// The site config with the operator identity: `presenced cmd`.
    pub operator_config: PathBuf,
    pub provision_log: PathBuf,
    pub simulator_log: PathBuf,
}

impl SitePlan {
    pub fn http_addr(&self) -> SocketAddr {
        loopback(self.http_port)
    }
}

/// The local S3 server (SeaweedFS) the archivers upload to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Plan {
    pub s3_port: u16,
    /// master, master gRPC, volume, volume gRPC, filer, filer gRPC, S3 gRPC.
    pub inner_ports: [u16; 7],
    pub dir: PathBuf,
    pub log_file: PathBuf,
    /// SeaweedFS identities (`-s3.config`): the one key pair it accepts.
    pub identities: PathBuf,
    pub access_key_file: PathBuf,
    pub secret_key_file: PathBuf,
    pub bucket: String,
}

impl S3Plan {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }
}

/// Ports the S3 server takes.
pub const S3_PORTS: usize = 8;

/// How often each site's archiver takes a snapshot in the sandbox: short,
/// so a newcomer sees snapshots arrive.
pub const SNAPSHOT_EVERY: &str = "30s";

/// Everything the sandbox runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub dir: PathBuf,
    pub hub: Vec<HubNodePlan>,
    pub sites: Vec<SitePlan>,
    /// One admin identity for the hub and every leaf: the seed a user
    /// hands to `nats --nkey`.
    pub admin_seed: PathBuf,
    /// Output of `presenced provision-hub`.
    pub hub_provision_log: PathBuf,
    /// `<pid> <name>` per line, for scripts and tests.
    pub pids_file: PathBuf,
    /// The S3 server, when SeaweedFS is available.
    pub s3: Option<S3Plan>,
    /// Present while a sandbox runs in this directory, and afterwards:
    /// marks the directory as the sandbox's (it may be reused or wiped).
    pub marker: PathBuf,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Ports each hub node needs: client, monitor, cluster, leafnode.
pub const PORTS_PER_HUB_NODE: usize = 4;
/// Ports each site needs: leaf client, leaf monitor, leaf MQTT, daemon HTTP.
pub const PORTS_PER_SITE: usize = 4;

/// How many ports a plan of `sites` sites takes.
pub fn ports_needed(sites: usize) -> usize {
    HUB_NODES * PORTS_PER_HUB_NODE + sites * PORTS_PER_SITE
}

/// Site ids: `site-1`, `site-2`, ...
pub fn site_id(index: usize) -> String {
    format!("site-{}", index + 1)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("--sites must be between 1 and {MAX_SITES}, not {0}")]
    Sites(usize),
    #[error("--dir {0} must be an absolute path")]
    Relative(PathBuf),
    #[error("needed {needed} ports, got {got}")]
    Ports { needed: usize, got: usize },
}

/// Enough to show a hub with several sites; more only loads the machine.
pub const MAX_SITES: usize = 16;

impl Plan {
    /// Lays out the sandbox; `ports` must hold [`ports_needed`] distinct
    /// free ports.
    pub fn new(input: &Input, ports: &[u16]) -> Result<Plan, PlanError> {
        if input.sites == 0 || input.sites > MAX_SITES {
            return Err(PlanError::Sites(input.sites));
        }
        if !input.dir.is_absolute() {
            return Err(PlanError::Relative(input.dir.clone()));
        }
        let needed = ports_needed(input.sites);
        if ports.len() < needed {
            return Err(PlanError::Ports {
                needed,
                got: ports.len(),
            });
        }
        let mut next = ports.iter().copied();
        let mut port = || next.next().unwrap_or_default();
        let dir = input.dir.clone();
        let hub_dir = dir.join("hub");
        let hub = (0..HUB_NODES)
            .map(|i| {
                let name = format!("hub-{}", i + 1);
                HubNodePlan {
                    client_port: port(),
                    monitor_port: port(),
                    cluster_port: port(),
                    leafnode_port: port(),
                    store_dir: hub_dir.join(&name).join("jetstream"),
                    config_path: hub_dir.join(&name).join("nats-server.conf"),
                    authorization_path: hub_dir.join(&name).join("authorization.conf"),
                    log_file: dir.join("logs").join(format!("{name}.log")),
                    name,
                }
            })
            .collect();
        let mut sites = Vec::new();
        for i in 0..input.sites {
            let id = site_id(i);
            // site_id always yields a valid id.
            let site = Site::new(&id).map_err(|_| PlanError::Sites(input.sites))?;
            let sdir = dir.join(&id);
            let keys = sdir.join("keys");
            let logs = dir.join("logs");
            sites.push(SitePlan {
                leaf: LeafPlan {
                    server_name: site.leaf_domain(),
                    client_port: port(),
                    monitor_port: port(),
                    mqtt_port: port(),
                    store_dir: sdir.join("leaf").join("jetstream"),
                    config_path: sdir.join("leaf").join("nats-server.conf"),
                    log_file: logs.join(format!("{id}-leaf.log")),
                    authorization_path: sdir.join("leaf").join("authorization.conf"),
                    hub_nkey_include: sdir.join("leaf").join("leafnode-nkey.conf"),
                },
                keys: SiteKeys {
                    service_seed: keys.join(format!("{SERVICE}.nk")),
                    operator_seed: keys.join(format!("{OPERATOR}.nk")),
                    leafnode_seed: keys.join("leafnode.nk"),
                    access_file: sdir.join("access.toml"),
                    simulator_password: keys.join("mqtt-simulator.password"),
                    daemon_mqtt_password: keys.join("mqtt-presenced.password"),
                },
                http_port: port(),
                daemon_config: sdir.join("presenced.toml"),
                daemon_log: logs.join(format!("{id}-presenced.log")),
                admin_config: sdir.join("admin.toml"),
                hub_admin_config: sdir.join("hub-admin.toml"),
                operator_config: sdir.join("operator.toml"),
                provision_log: logs.join(format!("{id}-provision.log")),
                simulator_log: logs.join(format!("{id}-simulator.log")),
                dir: sdir,
                site,
            });
        }
        Ok(Plan {
            admin_seed: dir.join("keys").join("admin.nk"),
            hub_provision_log: dir.join("logs").join("hub-provision.log"),
            pids_file: dir.join("pids"),
            s3: None,
            marker: dir.join(MARKER),
            hub,
            sites,
            dir,
        })
    }

    /// Adds the S3 server on `ports` ([`S3_PORTS`] of them).
    pub fn with_s3(mut self, ports: &[u16]) -> Result<Plan, PlanError> {
        if ports.len() < S3_PORTS {
            return Err(PlanError::Ports {
                needed: S3_PORTS,
                got: ports.len(),
            });
        }
        let dir = self.dir.join("s3");
        let mut inner = [0u16; 7];
        inner.copy_from_slice(&ports[1..S3_PORTS]);
        self.s3 = Some(S3Plan {
            s3_port: ports[0],
            inner_ports: inner,
            identities: dir.join("identities.json"),
            log_file: self.dir.join("logs").join("s3.log"),
            access_key_file: self.dir.join("keys").join("s3-access-key"),
            secret_key_file: self.dir.join("keys").join("s3-secret-key"),
            bucket: "presenced-sandbox".to_owned(),
            dir,
        });
        Ok(self)
    }

    /// Every directory to create before writing files.
    pub fn directories(&self) -> Vec<PathBuf> {
        let mut out = vec![
            self.dir.join("logs"),
            self.dir.join("keys"),
            self.dir.join("hub"),
        ];
        for h in &self.hub {
            out.extend(h.config_path.parent().map(Path::to_path_buf));
        }
        if let Some(s3) = &self.s3 {
            out.push(s3.dir.join("data"));
        }
        for s in &self.sites {
            out.push(s.dir.join("keys"));
            out.extend(s.leaf.config_path.parent().map(Path::to_path_buf));
        }
        out
    }

    /// Leafnode URLs of every hub node: a leaf lists them all, so its link
    /// survives the loss of any one node.
    pub fn hub_leafnode_urls(&self) -> Vec<String> {
        self.hub.iter().map(HubNodePlan::leafnode_url).collect()
    }

    /// Route URLs of the hub nodes other than `index`.
    pub fn hub_routes_except(&self, index: usize) -> Vec<String> {
        self.hub
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, h)| h.route_url())
            .collect()
    }
}

/// File marking a directory as a sandbox's.
pub const MARKER: &str = "presenced-sandbox";

/// The `[archive]` section of a site: a snapshot every
/// [`SNAPSHOT_EVERY`], uploaded to the sandbox's S3 under `<site>/`.
pub fn archive_config(
    site: &SitePlan,
    s3: &S3Plan,
) -> Result<crate::config::ArchiveConfig, ConfigError> {
    let text = format!(
        "every = {every:?}\nkeep_local = 20\nretry_max = \"10s\"\n\
         [s3]\nendpoint = {endpoint:?}\nregion = \"us-east-1\"\nbucket = {bucket:?}\n\
         prefix = \"{site}/\"\npath_style = true\naccess_key_file = {ak:?}\n\
         secret_key_file = {sk:?}\ntimeout = \"10s\"\n",
        every = SNAPSHOT_EVERY,
        endpoint = s3.endpoint(),
        bucket = s3.bucket,
        site = site.site,
        ak = s3.access_key_file.display().to_string(),
        sk = s3.secret_key_file.display().to_string(),
    );
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: PathBuf::from("sandbox [archive]"),
        message: e.to_string(),
    })
}

/// The config the daemon of `site` runs: the example's zones and evidence,
/// this sandbox's ports, identity and MQTT credentials, and the archiver
/// when there is an S3 server.
pub fn daemon_config(site: &SitePlan, s3: Option<&S3Plan>) -> Result<Config, ConfigError> {
    let mut cfg = Config::from_toml(EXAMPLE_CONFIG, Path::new("examples/sandbox.toml"))?;
    cfg.site = site.site.as_str().to_owned();
    cfg.service = SERVICE.to_owned();
    cfg.nats.url = site.leaf.client_url();
    cfg.nats.nkey_seed_file = Some(site.keys.service_seed.clone());
    cfg.http.listen = site.http_addr();
    if let Some(mqtt) = cfg.mqtt.get_mut(MQTT_SOURCE) {
        mqtt.host = "127.0.0.1".to_owned();
        mqtt.port = site.leaf.mqtt_port;
        mqtt.client_id = Some(format!("presenced-{}-{MQTT_SOURCE}", site.site));
        mqtt.username = Some(DAEMON_MQTT_USER.to_owned());
        mqtt.password_file = Some(site.keys.daemon_mqtt_password.clone());
    }
    cfg.archive = s3.map(|s3| archive_config(site, s3)).transpose()?;
    // Hub mirror health and nudges, through the site's link under the
    // generated hub ACL (docs/SECURITY.md).
    cfg.hub = Some(crate::config::HubWatch::default());
    Ok(cfg)
}

/// The site config with the operator identity: what `presenced cmd`
/// runs as (the ownership map grants it `commands`).
pub fn operator_config(site: &SitePlan, s3: Option<&S3Plan>) -> Result<Config, ConfigError> {
    let mut cfg = daemon_config(site, s3)?;
    cfg.service = OPERATOR.to_owned();
    cfg.nats.nkey_seed_file = Some(site.keys.operator_seed.clone());
    cfg.http.enabled = false;
    Ok(cfg)
}

/// The site config with the admin identity: what `provision` runs as and
/// what a user hands to `watch`/`get`. The sources stay (a config without
/// them is invalid) but these commands never start them.
pub fn admin_config(
    site: &SitePlan,
    admin_seed: &Path,
    s3: Option<&S3Plan>,
) -> Result<Config, ConfigError> {
    let mut cfg = daemon_config(site, s3)?;
    cfg.service = "admin".to_owned();
    cfg.nats.nkey_seed_file = Some(admin_seed.to_path_buf());
    cfg.http.enabled = false;
    Ok(cfg)
}

/// Admin config pointing at the first hub node, for reading the mirrors.
pub fn hub_admin_config(plan: &Plan, site: &SitePlan) -> Result<Config, ConfigError> {
    let mut cfg = admin_config(site, &plan.admin_seed, plan.s3.as_ref())?;
    if let Some(h) = plan.hub.first() {
        cfg.nats.url = h.client_url();
    }
    Ok(cfg)
}

/// The rooms the example config has zones for.
pub fn rooms(cfg: &Config) -> Vec<String> {
    cfg.zones.keys().cloned().collect()
}

/// Rooms with a door sensor (`<room>_door` used by some zone).
pub fn rooms_with_door(cfg: &Config) -> Vec<String> {
    cfg.zones
        .iter()
        .filter(|(room, z)| {
            let door = format!("{room}_door");
            z.evidence.iter().any(|e| e.sensor == door)
        })
        .map(|(room, _)| room.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(sites: usize) -> Plan {
        let ports: Vec<u16> = (10_000..10_000 + ports_needed(sites) as u16).collect();
        Plan::new(
            &Input {
                sites,
                dir: PathBuf::from("/tmp/sbx"),
            },
            &ports,
        )
        .unwrap()
    }

    #[test]
    fn every_port_is_used_once() {
        let p = plan(3);
        let mut used = Vec::new();
        for h in &p.hub {
            used.extend([
                h.client_port,
                h.monitor_port,
                h.cluster_port,
                h.leafnode_port,
            ]);
        }
        for s in &p.sites {
            used.extend([
                s.leaf.client_port,
                s.leaf.monitor_port,
                s.leaf.mqtt_port,
                s.http_port,
            ]);
        }
        let n = used.len();
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), n);
        assert_eq!(n, ports_needed(3));
    }

    #[test]
    fn names_follow_the_naming_convention() {
        let p = plan(2);
        assert_eq!(
            p.hub.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
            ["hub-1", "hub-2", "hub-3"]
        );
        assert_eq!(p.sites[1].site.as_str(), "site-2");
        assert_eq!(p.sites[1].leaf.server_name, "leaf-site-2");
        assert_eq!(p.hub_routes_except(1).len(), 2);
        assert!(!p.hub_routes_except(1).contains(&p.hub[1].route_url()));
        assert_eq!(p.hub_leafnode_urls().len(), 3);
        assert!(p.directories().iter().all(|d| d.starts_with("/tmp/sbx")));
    }

    #[test]
    fn bad_input_is_refused() {
        let dir = PathBuf::from("/tmp/x");
        assert_eq!(
            Plan::new(
                &Input {
                    sites: 0,
                    dir: dir.clone()
                },
                &[]
            ),
            Err(PlanError::Sites(0))
        );
        assert!(matches!(
            Plan::new(
                &Input {
                    sites: 1,
                    dir: PathBuf::from("rel")
                },
                &[1; 64]
            ),
            Err(PlanError::Relative(_))
        ));
        assert!(matches!(
            Plan::new(&Input { sites: 1, dir }, &[1, 2]),
            Err(PlanError::Ports { .. })
        ));
    }

    #[test]
    fn daemon_config_is_valid_and_points_at_the_sites_leaf() {
        let p = plan(2);
        let s = &p.sites[1];
        let cfg = daemon_config(s, None).unwrap();
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        assert_eq!(cfg.site, "site-2");
        assert_eq!(cfg.nats.url, s.leaf.client_url());
        assert_eq!(cfg.http.listen.port(), s.http_port);
        let m = &cfg.mqtt[MQTT_SOURCE];
        assert_eq!(m.port, s.leaf.mqtt_port);
        assert_eq!(m.username.as_deref(), Some(DAEMON_MQTT_USER));
        // It survives a round trip through the file the daemon reads.
        let text = toml::to_string(&cfg).unwrap();
        let back = Config::from_toml(&text, Path::new("x.toml")).unwrap();
        assert!(back.validate().is_empty());
        assert_eq!(back.zones.len(), cfg.zones.len());

        let admin = admin_config(s, &p.admin_seed, None).unwrap();
        assert!(admin.validate().is_empty(), "{:?}", admin.validate());
        assert!(!admin.http.enabled);
        assert_eq!(
            admin.nats.nkey_seed_file.as_deref(),
            Some(p.admin_seed.as_path())
        );
        let hub = hub_admin_config(&p, s).unwrap();
        assert_eq!(hub.nats.url, p.hub[0].client_url());
        assert!(cfg.archive.is_none());
    }

    #[test]
    fn with_s3_the_daemons_archive_to_it() {
        let p = plan(2).with_s3(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let s3 = p.s3.as_ref().unwrap();
        assert_eq!(s3.endpoint(), "http://127.0.0.1:1");
        assert_eq!(s3.inner_ports, [2, 3, 4, 5, 6, 7, 8]);
        let cfg = daemon_config(&p.sites[1], Some(s3)).unwrap();
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        let a = cfg.archive.as_ref().unwrap();
        assert_eq!(a.every, std::time::Duration::from_secs(30));
        let remote = a.s3.as_ref().unwrap();
        assert_eq!(remote.prefix, "site-2/");
        assert!(remote.path_style);
        assert_eq!(remote.endpoint, s3.endpoint());
        let text = toml::to_string(&cfg).unwrap();
        let back = Config::from_toml(&text, Path::new("x.toml")).unwrap();
        assert!(back.validate().is_empty());
        assert!(back.archive.is_some());
        assert!(plan(1).with_s3(&[1, 2]).is_err());
    }

    #[test]
    fn the_example_has_rooms_with_all_three_kinds_of_evidence() {
        let cfg = Config::from_toml(EXAMPLE_CONFIG, Path::new("x")).unwrap();
        let rooms = rooms(&cfg);
        assert!(rooms.len() >= 3, "{rooms:?}");
        assert!(!rooms_with_door(&cfg).is_empty());
        for r in &rooms {
            let z = &cfg.zones[r];
            assert!(z.evidence.iter().any(|e| e.sensor == format!("{r}_motion")));
            assert!(z.evidence.iter().any(|e| e.sensor == format!("{r}_lux")));
        }
    }
}
