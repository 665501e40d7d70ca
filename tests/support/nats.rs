//! `nats-server` with JetStream on loopback ports it picks itself (port
//! `-1`: no port is chosen here that another test could take first), its
//! store in a temporary directory that survives restarts of the same
//! `NatsServer`. The ports it chose are read back once (the ports file for
//! the client and monitoring ports, `/varz` for the leafnode and MQTT
//! ports) and written into its config, so a restart keeps them.

use super::http_get;
use super::process::{self, log_tail, Harnessed as _, ProcError};
use std::env;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Oldest server the daemon supports: older servers reject parts of the
/// strict JetStream API and KV features the daemon relies on.
pub const MIN_NATS_VERSION: (u32, u32, u32) = (2, 11, 0);

const READY_DEADLINE: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The version in `nats-server --version` output such as
/// `nats-server: v2.15.1` (pre-release suffixes ignored).
pub fn parse_nats_version(output: &str) -> Option<(u32, u32, u32)> {
    // The first `v` directly followed by a digit: `nats-server` has a `v` too.
    let start = output
        .char_indices()
        .find(|&(i, c)| c == 'v' && output[i + 1..].starts_with(|d: char| d.is_ascii_digit()))?
        .0
        + 1;
    let text = &output[start..];
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let mut numbers = text[..end].split('.').map(str::parse::<u32>);
    let major = numbers.next()?.ok()?;
    let minor = numbers.next()?.ok()?;
    let patch = numbers.next().unwrap_or(Ok(0)).ok()?;
    Some((major, minor, patch))
}

/// The server version if it is at least [`MIN_NATS_VERSION`], else a
/// message saying what was found and what to do.
pub fn check_nats_version(output: &str) -> Result<(u32, u32, u32), String> {
    let found = parse_nats_version(output).ok_or_else(|| {
        format!("cannot read a version from `nats-server --version` output {output:?}")
    })?;
    if found < MIN_NATS_VERSION {
        let (a, b, c) = MIN_NATS_VERSION;
        return Err(format!(
            "nats-server {}.{}.{} is too old (need >= {a}.{b}.{c}); run scripts/setup.sh \
             and `source scripts/env.sh`, or set NATS_SERVER",
            found.0, found.1, found.2
        ));
    }
    Ok(found)
}

pub use presenced_procs::find_on_path;

/// The `nats-server` to test against: `$NATS_SERVER`, else `PATH`.
/// Checked once per test process; panics if missing or too old, since no
/// integration test means anything without it.
pub fn nats_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = env::var_os("NATS_SERVER")
            .map(PathBuf::from)
            .or_else(|| find_on_path("nats-server"))
            .unwrap_or_else(|| {
                panic!(
                    "nats-server not found (neither $NATS_SERVER nor PATH): run scripts/setup.sh, \
                     then `source scripts/env.sh`"
                )
            });
        let output = Command::new(&bin)
            .arg("--version")
            .output()
            .unwrap_or_else(|error| panic!("cannot run {} --version: {error}", bin.display()));
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        if let Err(message) = check_nats_version(&text) {
            panic!("{}: {message}", bin.display());
        }
        bin
    })
    .clone()
}

/// What the test needs from the server beyond JetStream on a free port.
#[derive(Clone, Debug, Default)]
pub struct NatsOptions {
    /// JetStream domain (`leaf-<site>` for a site's leaf, `hub` for a hub).
    pub domain: Option<String>,
    /// Also serve MQTT on a free port.
    pub mqtt: bool,
    /// Raw nats-server configuration appended to the generated file.
    pub extra: String,
    /// fsync every JetStream write (`sync_interval: always`), as an edge
    /// host that loses power should run.
    pub sync_always: bool,
    /// Accept leafnode connections on a free port (for a hub).
    pub leafnode_listen: bool,
    /// Leafnode URLs to connect to as a leaf (e.g. a hub's
    /// [`NatsServer::leafnode_url`]).
    pub leaf_remotes: Vec<String>,
    /// Server name; default `test-<port>`. MQTT and clustering need one.
    pub server_name: Option<String>,
    /// Cluster routes of a hub node (see [`super::Hub`]).
    pub cluster: Option<ClusterPorts>,
    /// JetStream `sync_interval`; default the renderer's (`sync_always`
    /// wins when set).
    pub sync_interval: Option<presenced::natsconf::SyncInterval>,
    /// TLS on the client port.
    pub tls: Option<presenced::natsconf::ServerTls>,
    /// TLS on a hub's leafnode listener.
    pub leafnode_tls: Option<presenced::natsconf::ServerTls>,
    /// TLS of a leaf's link to its [`NatsOptions::leaf_remotes`].
    pub remote_tls: Option<presenced::natsconf::LinkTls>,
    /// The NKEY seed a leaf's link authenticates to the hub with (the
    /// site's leafnode identity), written beside the config and included
    /// into the remote, as the NixOS module deploys it.
    pub remote_seed: Option<String>,
}

/// The file [`NatsOptions::remote_seed`] is written to, in the server's
/// directory (an include is relative to the config's).
const REMOTE_SEED_FILE: &str = "leaf-nkey.conf";

/// A hub node's route port and its peers' route ports.
#[derive(Clone, Debug, Default)]
pub struct ClusterPorts {
    pub port: u16,
    pub routes: Vec<u16>,
}

/// A running `nats-server`; killed and its directory removed on `Drop`.
pub struct NatsServer {
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// MQTT port on 127.0.0.1, when [`NatsOptions::mqtt`] was set.
    pub mqtt_port: Option<u16>,
    /// HTTP monitoring port on 127.0.0.1 (`/healthz`, `/jsz`, `/varz`).
    pub monitor_port: u16,
    /// Leafnode listen port, when [`NatsOptions::leafnode_listen`] was set.
    pub leafnode_port: Option<u16>,
    /// JetStream store; kept across [`NatsServer::restart`].
    pub store_dir: PathBuf,
    process: process::Supervised,
    config_path: PathBuf,
    log_path: PathBuf,
    // Last field: removed after the server is gone.
    dir: TempDir,
}

impl NatsServer {
    /// Writes a config, starts the server and waits until JetStream is
    /// ready; panics with the log tail if it does not come up in 10 s.
    pub fn start(opts: NatsOptions) -> NatsServer {
        NatsServer::try_start(opts).unwrap_or_else(|error| panic!("{error}"))
    }

    /// [`NatsServer::start`], saying why the server exited during its
    /// start (with the log tail, and the line naming a taken port: a hub
    /// node's route port is picked ahead) instead of panicking. Nothing is
    /// left running on an error.
    pub fn try_start(opts: NatsOptions) -> Result<NatsServer, ProcError> {
        let dir = tempfile::Builder::new()
            .prefix("nats-test-")
            .tempdir()
            .expect("create a temp dir for nats-server");
        let hub = opts.domain.as_deref() == Some(presenced::naming::HUB_DOMAIN);
        let store_dir = dir.path().join("jetstream");
        let log_path = dir.path().join("nats-server.log");
        let config_path = dir.path().join("nats-server.conf");
        let ports_dir = dir.path().join("ports");
        std::fs::create_dir_all(&ports_dir).expect("create the ports file directory");
        if let Some(seed) = &opts.remote_seed {
            std::fs::write(
                dir.path().join(REMOTE_SEED_FILE),
                format!("nkey: \"{seed}\"\n"),
            )
            .expect("write the leaf's seed include");
        }
        // Any free port, chosen by the server as it binds.
        let any = Ports {
            port: 0,
            monitor_port: 0,
            mqtt_port: opts.mqtt.then_some(0),
            leafnode_port: (opts.leafnode_listen || hub).then_some(0),
        };
        // A name unique among the servers a test runs, known before the port.
        let unique = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("nats-test-"))
            .unwrap_or("server")
            .to_owned();
        let first = render_config(
            &opts,
            &any,
            &unique,
            &store_dir,
            &log_path,
            Some(&ports_dir),
        );
        std::fs::write(&config_path, first).expect("write nats-server config");
        let mut server = NatsServer {
            port: 0,
            mqtt_port: None,
            monitor_port: 0,
            leafnode_port: None,
            store_dir,
            process: process::Supervised::new("nats-server", log_path.clone()),
            config_path,
            log_path,
            dir,
        };
        let mut command = Command::new(nats_server_bin());
        command.arg("-c").arg(&server.config_path);
        // It writes its own log (log_file in the config).
        server.process.spawn(command, false)?;
        let ports = server.read_ports(&ports_dir, &any)?;
        server.port = ports.port;
        server.monitor_port = ports.monitor_port;
        server.mqtt_port = ports.mqtt_port;
        server.leafnode_port = ports.leafnode_port;
        server.try_wait_ready()?;
        // Restarts keep the ports (clients reconnect to the same URLs).
        let config = render_config(
            &opts,
            &ports,
            &unique,
            &server.store_dir,
            &server.log_path,
            None,
        );
        std::fs::write(&server.config_path, config).expect("write nats-server config");
        Ok(server)
    }

    /// The ports the server chose: client and monitoring from its ports
    /// file, leafnode and MQTT from `/varz`.
    fn read_ports(&mut self, dir: &Path, wanted: &Ports) -> Result<Ports, ProcError> {
        let start = Instant::now();
        let urls = loop {
            let found = std::fs::read_dir(dir)
                .ok()
                .and_then(|mut entries| entries.next())
                .and_then(|e| e.ok())
                .and_then(|e| std::fs::read_to_string(e.path()).ok())
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
            if let Some(urls) = found {
                break urls;
            }
            if let Some(error) = self.process.exited() {
                return Err(error);
            }
            assert!(
                start.elapsed() < READY_DEADLINE,
                "nats-server wrote no ports file within {READY_DEADLINE:?}; log tail:\n{}",
                log_tail(&self.log_path)
            );
            std::thread::sleep(super::wait::POLL);
        };
        let port_of = |key: &str| -> u16 {
            urls[key][0]
                .as_str()
                .and_then(|u| u.rsplit(':').next())
                .and_then(|p| p.trim_end_matches('/').parse().ok())
                .unwrap_or_else(|| panic!("no {key} URL in the ports file: {urls}"))
        };
        let monitor_port = port_of("monitoring");
        let varz = loop {
            if let Some((200, body)) =
                http_get(SocketAddr::from(([127, 0, 0, 1], monitor_port)), "/varz")
            {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                    break v;
                }
            }
            if let Some(error) = self.process.exited() {
                return Err(error);
            }
            assert!(
                start.elapsed() < READY_DEADLINE,
                "no /varz within {READY_DEADLINE:?}"
            );
            std::thread::sleep(super::wait::POLL);
        };
        let listener = |key: &str| -> u16 {
            varz[key]["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("no {key}.port in /varz: {varz}"))
        };
        Ok(Ports {
            port: port_of("nats"),
            monitor_port,
            mqtt_port: wanted.mqtt_port.map(|_| listener("mqtt")),
            leafnode_port: wanted.leafnode_port.map(|_| listener("leaf")),
        })
    }

    /// Why the server has exited, once it has (`None` while it runs).
    pub fn exited(&mut self) -> Option<ProcError> {
        self.process.exited()
    }

    /// Client URL.
    /// Process id of the running server (0 when stopped), for /proc
    /// readings in benchmarks.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// URL a leaf connects to, when [`NatsOptions::leafnode_listen`] was set.
    pub fn leafnode_url(&self) -> Option<String> {
        self.leafnode_port
            .map(|port| format!("nats-leaf://127.0.0.1:{port}"))
    }

    /// The monitoring endpoint.
    pub fn monitor_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.monitor_port))
    }

    /// The generated config file (to read, or to copy for a variant).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Graceful stop: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        self.process.stop(STOP_GRACE);
    }

    /// Abrupt stop, as a crash or power loss of the server process.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Stops (if running) and starts again with the same ports, config and
    /// store, waiting until ready.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the server again after [`NatsServer::kill`] or
    /// [`NatsServer::stop`]: same ports, config and store, waiting until
    /// ready.
    pub fn start_again(&mut self) {
        assert!(!self.process.is_running(), "nats-server is still running");
        self.process.kill();
        self.spawn();
    }

    /// Whether the server process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The server log so far (all runs of this `NatsServer`).
    pub fn log(&self) -> String {
        self.process.log()
    }

    fn spawn(&mut self) {
        self.spawn_child();
        self.wait_ready();
    }

    fn spawn_child(&mut self) {
        let mut command = Command::new(nats_server_bin());
        command.arg("-c").arg(&self.config_path);
        // It writes its own log (log_file in the config).
        self.process.start(command, false);
    }

    fn try_wait_ready(&mut self) -> Result<(), ProcError> {
        let addr = self.monitor_addr();
        self.process.wait_ready(READY_DEADLINE, |_| {
            matches!(
                http_get(addr, "/healthz?js-enabled-only=true"),
                Some((200, _))
            )
        })
    }

    fn wait_ready(&mut self) {
        if let Err(error) = self.try_wait_ready() {
            panic!(
                "nats-server on port {} (config {}): {error}",
                self.port,
                self.config_path.display()
            );
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Ports {
    port: u16,
    monitor_port: u16,
    mqtt_port: Option<u16>,
    leafnode_port: Option<u16>,
}

/// The config through the project's renderer (`presenced::natsconf`), so
/// tests run the servers the NixOS modules and the sandbox run: a hub node
/// for domain `hub`, else the leaf of site `<site>` for domain
/// `leaf-<site>` (site `test` when no domain is given). `opts.extra` is
/// appended as is.
fn render_config(
    opts: &NatsOptions,
    ports: &Ports,
    unique: &str,
    store_dir: &Path,
    log_path: &Path,
    ports_file_dir: Option<&Path>,
) -> String {
    use presenced::natsconf::{self, SyncInterval};
    let name = opts
        .server_name
        .clone()
        .unwrap_or_else(|| format!("test-{unique}"));
    // Port 0 here: any free port (`-1` in nats-server's terms).
    let addr = |port: u16| match port {
        0 => "127.0.0.1:-1".to_owned(),
        port => format!("127.0.0.1:{port}"),
    };
    let listen = addr(ports.port);
    let sync = |js: &mut natsconf::JetStream| {
        if let Some(interval) = opts.sync_interval {
            js.sync_interval = interval;
        }
        if opts.sync_always {
            js.sync_interval = SyncInterval::Always;
        }
    };
    let mut config = if opts.domain.as_deref() == Some(presenced::naming::HUB_DOMAIN) {
        let mut hub = natsconf::HubNode::new(&name, store_dir.to_path_buf());
        hub.listen = listen;
        hub.tls = opts.tls.clone();
        hub.leafnodes.tls = opts.leafnode_tls.clone();
        hub.monitor_port = ports.monitor_port;
        hub.ports_file_dir = ports_file_dir.map(Path::to_path_buf);
        hub.log_file = Some(log_path.to_path_buf());
        sync(&mut hub.jetstream);
        let leaf_port = ports
            .leafnode_port
            .expect("a hub node always gets a leafnode port");
        hub.leafnodes.listen = addr(leaf_port);
        // Leaves dial only what they list, so a test can put a proxy in
        // the link and cut it.
        hub.leafnodes.no_advertise = true;
        if let Some(cluster) = &opts.cluster {
            hub.cluster = Some(natsconf::Cluster {
                name: "presenced-hub".into(),
                listen: format!("127.0.0.1:{}", cluster.port),
                routes: cluster
                    .routes
                    .iter()
                    .map(|port| format!("nats-route://127.0.0.1:{port}"))
                    .collect(),
            });
        }
        hub.render()
    } else {
        let site = match opts.domain.as_deref() {
            None => "test",
            Some(domain) => domain.strip_prefix("leaf-").unwrap_or_else(|| {
                panic!("test servers run domain `hub` or `leaf-<site>`, not {domain:?}")
            }),
        };
        let site = presenced::naming::Site::new(site).expect("a valid site id in the domain");
        let mut leaf = natsconf::Leaf::new(&site, store_dir.to_path_buf());
        leaf.server_name = Some(name);
        leaf.listen = listen;
        leaf.tls = opts.tls.clone();
        leaf.monitor_port = ports.monitor_port;
        leaf.ports_file_dir = ports_file_dir.map(Path::to_path_buf);
        leaf.log_file = Some(log_path.to_path_buf());
        sync(&mut leaf.jetstream);
        if !opts.leaf_remotes.is_empty() {
            leaf.hub = Some(natsconf::HubLink {
                tls: opts.remote_tls.clone(),
                nkey_include: opts
                    .remote_seed
                    .as_ref()
                    .map(|_| PathBuf::from(REMOTE_SEED_FILE)),
                ..natsconf::HubLink::new(opts.leaf_remotes.clone())
            });
        }
        leaf.mqtt = ports
            .mqtt_port
            .map(|port| natsconf::Mqtt { listen: addr(port) });
        assert!(
            ports.leafnode_port.is_none(),
            "only hub nodes (domain `hub`) accept leafnode connections"
        );
        leaf.render()
    }
    .unwrap_or_else(|error| panic!("the test's nats-server description is invalid: {error}"));
    config.push_str(&opts.extra);
    config.push('\n');
    config
}
