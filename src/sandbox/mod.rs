//! `presenced sandbox`: a whole deployment on loopback, for a newcomer's
//! first run and for end-to-end tests. A 3-node hub, one leaf per site, the
//! daemon per site on `examples/sandbox.toml`, simulated people whose
//! sensors publish over MQTT to each leaf's own listener, and, when
//! SeaweedFS is installed, a local S3 server the archivers upload to.
//! Identities and ACLs are generated as on a real site.
//!
//! - [`plan`]: ports, directories, names and configs (pure).
//! - [`servers`]: nats-server configs through the `nats-config` renderer.
//! - [`identities`]: NKEY seeds, MQTT passwords, access files, ACLs.
//! - [`supervisor`]: child processes that cannot outlive the sandbox, each
//!   a `presenced_procs::Supervised` (the tests' child type too).
//! - [`simulator`]: people walking between rooms, and their sensors.
//! - [`tools`]: finding nats-server and SeaweedFS.
//! - [`probe`]: health endpoints, leafnode links (ports are picked by
//!   `presenced_procs`, below the kernel's ephemeral range).

pub mod identities;
pub mod plan;
pub mod probe;
pub mod servers;
pub mod simulator;
pub mod supervisor;
pub mod tools;
pub mod truth;

use plan::{Input, Plan, SitePlan};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use supervisor::{log_tail, Supervisor};

/// What `presenced sandbox` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub sites: usize,
    /// Default `.sandbox` in the working directory.
    pub dir: Option<PathBuf>,
    /// Stop by itself after this long (scripts, tests); default: run until
    /// Ctrl-C or SIGTERM.
    pub seconds: Option<u64>,
    /// Remove the state of a previous run in `dir` first.
    pub fresh: bool,
    /// Simulated people per site.
    pub people: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Tool(#[from] tools::ToolError),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Identity(#[from] identities::IdentityError),
    #[error(transparent)]
    Render(#[from] servers::RenderError),
    #[error(transparent)]
    Supervise(#[from] supervisor::SuperviseError),
    #[error(transparent)]
    Proc(#[from] presenced_procs::ProcError),
    #[error("{path}: {message}")]
    Dir { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find free loopback ports: {0}")]
    Ports(std::io::Error),
    #[error("{what} did not become ready within {secs} s; last lines of {log}:\n{tail}", log = .log.display())]
    NotReady {
        what: String,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} exited ({status}); last lines of {log}:\n{tail}", log = .log.display())]
    Exited {
        what: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot find this program's own path (to run the daemons): {0}")]
    CurrentExe(std::io::Error),
}

/// Test hook: comma-separated ports for the first start, so that a test
/// can hand the sandbox a port it holds and see it start again elsewhere:
/// [`plan::ports_needed`] of them for the servers, then optionally
/// [`plan::S3_PORTS`] more for SeaweedFS (the S3 port first).
const FIRST_PORTS_ENV: &str = "PRESENCED_SANDBOX_FIRST_PORTS";

fn first_ports(sites: usize) -> Option<Vec<u16>> {
    let text = std::env::var(FIRST_PORTS_ENV).ok()?;
    let ports: Vec<u16> = text
        .split(',')
        .map(|p| p.trim().parse().ok())
        .collect::<Option<_>>()?;
    (ports.len() >= plan::ports_needed(sites)).then_some(ports)
}

impl SandboxError {
    /// When a child stopped because a port it was to listen on was taken
    /// (so that fresh ports may help): which child and the log line that
    /// says so, found in the child's whole log of this run.
    fn port_taken(&self) -> Option<String> {
        match self {
            SandboxError::Proc(e)
            | SandboxError::Supervise(supervisor::SuperviseError::Proc(e)) => e.port_taken(),
            SandboxError::NotReady { what, tail, .. } => {
                presenced_procs::port_taken_in(tail).map(|line| format!("{what}: {line}"))
            }
            _ => None,
        }
    }
}

/// How long servers get to come up on a loaded machine.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long a child gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// How long the S3 server gets to stop before SIGKILL.
const S3_STOP_GRACE: Duration = Duration::from_secs(3);

/// Tiers: higher tiers stop first.
const TIER_HUB: u8 = 0;
const TIER_LEAF: u8 = 1;
const TIER_DAEMON: u8 = 2;

/// Runs the sandbox until Ctrl-C, SIGTERM, `--seconds`, or a child's
/// unexpected exit (an error). Must run on the main thread: children are
/// tied to the thread that starts them.
pub fn run(opts: Options) -> Result<(), SandboxError> {
    let nats = tools::nats_server()?;
    let exe = std::env::current_exe().map_err(SandboxError::CurrentExe)?;
    let dir = absolute(
        opts.dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".sandbox")),
    )?;
    prepare_dir(&dir, opts.fresh)?;
    let weed = tools::weed();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(SandboxError::Runtime)?;
    let pids_file = dir.join("pids");
    let mut sup = Supervisor::new(pids_file);
    let started = Instant::now();
    // The ports are free a moment before the servers bind them; another
    // program can take one in between (and a JetStream cluster needs its
    // route ports before any node starts, so they cannot all be left to
    // the servers). A start that fails on a taken port is stopped and
    // tried again on fresh ones.
    let outcome = presenced_procs::retry_on_taken_port(
        |attempt| {
            let needed = plan::ports_needed(opts.sites);
            let (ports, s3_first) = match (attempt, first_ports(opts.sites)) {
                (1, Some(mut ports)) => {
                    let s3 = ports.split_off(needed);
                    (ports, Some(s3).filter(|s3| s3.len() >= plan::S3_PORTS))
                }
                _ => (
                    presenced_procs::free_ports(needed).map_err(SandboxError::Ports)?,
                    None,
                ),
            };
            let mut plan = Plan::new(
                &Input {
                    sites: opts.sites,
                    dir: dir.clone(),
                },
                &ports,
            )?;
            if weed.is_some() {
                let s3_ports = match s3_first {
                    Some(ports) => ports,
                    None => {
                        presenced_procs::free_ports(plan::S3_PORTS).map_err(SandboxError::Ports)?
                    }
                };
                plan = plan.with_s3(&s3_ports)?;
            }
            for d in plan.directories() {
                std::fs::create_dir_all(&d)
                    .map_err(|source| SandboxError::Write { path: d, source })?;
            }
            let ids = identities::ensure(&plan)?;
            write_configs(&plan)?;
            match start_all(&plan, &nats.path, weed.as_deref(), &exe, &mut sup) {
                Ok(()) => Ok((plan, ids)),
                Err(e) => {
                    sup.stop_all(STOP_GRACE);
                    Err(e)
                }
            }
        },
        SandboxError::port_taken,
        |_, why| println!("sandbox: a port was taken ({why}); starting again on fresh ports"),
    );
    let result = outcome.and_then(|(plan, ids)| {
        let sims: Vec<_> = plan
            .sites
            .iter()
            .enumerate()
            .map(|(i, s)| runtime.spawn(simulator::run(simulator_target(s, &ids, i, opts.people))))
            .collect();
        println!(
            "{}",
            summary(&plan, &nats, weed.as_deref(), &exe, &sup, opts.people)
        );
        println!(
            "sandbox: ready after {:.1} s (pids in {})",
            started.elapsed().as_secs_f64(),
            plan.pids_file.display()
        );
        let outcome = runtime.block_on(wait_for_end(&mut sup, opts.seconds));
        for s in sims {
            s.abort();
        }
        outcome
    });
    println!("sandbox: stopping");
    sup.stop_all(STOP_GRACE);
    runtime.shutdown_timeout(Duration::from_secs(2));
    println!(
        "sandbox: stopped; state, logs and keys stay in {}",
        dir.display()
    );
    result
}

fn absolute(dir: PathBuf) -> Result<PathBuf, SandboxError> {
    if dir.is_absolute() {
        return Ok(dir);
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(&dir))
        .map_err(|e| SandboxError::Dir {
            path: dir,
            message: format!("cannot resolve against the working directory: {e}"),
        })
}

/// Makes `dir` the sandbox's: new, or one a previous sandbox left (its
/// keys and JetStream state are reused, or wiped with `--fresh`). Anything
/// else is refused: the sandbox never deletes a directory it did not make.
fn prepare_dir(dir: &Path, fresh: bool) -> Result<(), SandboxError> {
    let marker = dir.join(plan::MARKER);
    let err = |message: String| SandboxError::Dir {
        path: dir.to_owned(),
        message,
    };
    let exists = dir.exists();
    if exists {
        let empty = std::fs::read_dir(dir)
            .map_err(|e| err(format!("cannot read: {e}")))?
            .next()
            .is_none();
        if !empty && !marker.exists() {
            return Err(err(format!(
                "not empty and not a sandbox directory (no {} file); choose another --dir",
                plan::MARKER
            )));
        }
        if let Some(pid) = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            // SAFETY: signal 0 only checks whether the pid exists.
            let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
            if alive && pid != std::process::id() as i32 && is_sandbox(pid) {
                return Err(err(format!(
                    "a sandbox (pid {pid}) is already running here; stop it first or choose another --dir"
                )));
            }
        }
        if fresh && !empty {
            std::fs::remove_dir_all(dir)
                .map_err(|e| err(format!("cannot remove for --fresh: {e}")))?;
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create: {e}")))?;
    std::fs::write(&marker, format!("{}\n", std::process::id())).map_err(|source| {
        SandboxError::Write {
            path: marker.clone(),
            source,
        }
    })
}

/// Whether `pid` runs a presenced binary (so a recycled pid does not
/// block a new sandbox).
fn is_sandbox(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let text = String::from_utf8_lossy(&c);
            text.contains("presenced") && text.contains("sandbox")
        })
        .unwrap_or(false)
}

fn write_file(path: &Path, text: &str) -> Result<(), SandboxError> {
    std::fs::write(path, text).map_err(|source| SandboxError::Write {
        path: path.to_owned(),
        source,
    })
}

fn write_toml(path: &Path, cfg: &crate::config::Config) -> Result<(), SandboxError> {
    let text = toml::to_string(cfg).map_err(|e| SandboxError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?;
    write_file(
        path,
        &format!("# Generated by `presenced sandbox` from examples/sandbox.toml.\n{text}"),
    )
}

fn write_configs(plan: &Plan) -> Result<(), SandboxError> {
    for (i, h) in plan.hub.iter().enumerate() {
        write_file(&h.config_path, &servers::hub_node(plan, i)?)?;
    }
    for s in &plan.sites {
        write_file(&s.leaf.config_path, &servers::leaf(plan, s)?)?;
        let s3 = plan.s3.as_ref();
        write_toml(&s.daemon_config, &plan::daemon_config(s, s3)?)?;
        write_toml(
            &s.admin_config,
            &plan::admin_config(s, &plan.admin_seed, s3)?,
        )?;
        write_toml(&s.hub_admin_config, &plan::hub_admin_config(plan, s)?)?;
        write_toml(&s.operator_config, &plan::operator_config(s, s3)?)?;
    }
    Ok(())
}

/// Waits until `ready` holds, failing early when a child exits.
fn wait_ready(
    sup: &mut Supervisor,
    what: &str,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<(), SandboxError> {
    let start = Instant::now();
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(e) = sup.exited() {
            return Err(e.into());
        }
        if start.elapsed() >= READY_DEADLINE {
            return Err(SandboxError::NotReady {
                what: what.to_owned(),
                secs: READY_DEADLINE.as_secs(),
                log: log.to_owned(),
                tail: log_tail(log, 30),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_all(
    plan: &Plan,
    nats: &Path,
    weed: Option<&Path>,
    exe: &Path,
    sup: &mut Supervisor,
) -> Result<(), SandboxError> {
    println!(
        "sandbox: starting a hub of {} nodes and {} site(s) under {}",
        plan.hub.len(),
        plan.sites.len(),
        plan.dir.display()
    );
    if let (Some(s3), Some(weed)) = (&plan.s3, weed) {
        start_s3(s3, weed, sup)?;
    }
    for h in &plan.hub {
        sup.spawn(
            &h.name,
            TIER_HUB,
            nats,
            &[OsStr::new("-c"), h.config_path.as_os_str()],
            &h.log_file,
            &[],
        )?;
    }
    for h in &plan.hub {
        // Full /healthz: JetStream is up and the cluster has a meta leader.
        wait_ready(sup, &h.name, &h.log_file, || {
            probe::http_status(h.monitor_addr(), "/healthz") == Some(200)
        })?;
    }
    for s in &plan.sites {
        sup.spawn(
            &format!("{}-leaf", s.site),
            TIER_LEAF,
            nats,
            &[OsStr::new("-c"), s.leaf.config_path.as_os_str()],
            &s.leaf.log_file,
            &[],
        )?;
    }
    for s in &plan.sites {
        let what = format!("leaf of {} (JetStream and the link to the hub)", s.site);
        wait_ready(sup, &what, &s.leaf.log_file, || {
            probe::http_status(s.leaf.monitor_addr(), "/healthz?js-enabled-only=true") == Some(200)
                && probe::leafnode_links(s.leaf.monitor_addr()) >= 1
        })?;
    }
    for s in &plan.sites {
        provision(s, exe, sup)?;
    }
    provision_hub(plan, exe, sup)?;
    let mut daemons = Vec::new();
    for s in &plan.sites {
        let pid = sup.spawn(
            &format!("{}-presenced", s.site),
            TIER_DAEMON,
            exe,
            &[
                OsStr::new("run"),
                OsStr::new("--config"),
                s.daemon_config.as_os_str(),
            ],
            &s.daemon_log,
            &[],
        )?;
        daemons.push((s, pid));
    }
    for (s, pid) in daemons {
        let what = format!("presenced of {}", s.site);
        // Its own pid: another daemon on a taken port answers 200 too,
        // while this one fails to bind and exits (then retried on fresh
        // ports like a server).
        wait_ready(sup, &what, &s.daemon_log, || {
            probe::healthy_pid(s.http_addr()) == Some(pid)
        })?;
    }
    Ok(())
}

/// SeaweedFS as the S3 server (master, volume, filer and S3 gateway in one
/// process), on loopback, its keys from [`identities`].
fn start_s3(s3: &plan::S3Plan, weed: &Path, sup: &mut Supervisor) -> Result<(), SandboxError> {
    let [master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc] = s3.inner_ports;
    let args: Vec<String> = vec![
        "server".into(),
        format!("-dir={}", s3.dir.join("data").display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-master.port={master}"),
        format!("-master.port.grpc={master_grpc}"),
        // No usage reports leave the machine.
        "-master.telemetry=false".into(),
        "-master.volumeSizeLimitMB=64".into(),
        format!("-volume.port={volume}"),
        format!("-volume.port.grpc={volume_grpc}"),
        "-volume.max=30".into(),
        // The default (1% of the disk) turns every volume read-only on a
        // big, nearly full disk, and uploads hang; the sandbox writes little.
        "-volume.minFreeSpace=256MiB".into(),
        "-filer".into(),
        format!("-filer.port={filer}"),
        format!("-filer.port.grpc={filer_grpc}"),
        format!("-filer.localSocket={}", s3.dir.join("filer.sock").display()),
        "-s3".into(),
        format!("-s3.port={}", s3.s3_port),
        format!("-s3.port.grpc={s3_grpc}"),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        format!("-s3.localSocket={}", s3.dir.join("s3.sock").display()),
        format!("-s3.config={}", s3.identities.display()),
    ];
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    let pid = sup.spawn("s3", TIER_HUB, weed, &args, &s3.log_file, &[])?;
    // SeaweedFS waits 15 s for its internal gRPC streams on SIGTERM; every
    // upload it acknowledged is already verified, so it gets 3 s.
    sup.set_stop_grace(pid, S3_STOP_GRACE);
    // An HTTP answer (anonymous requests are refused, which is one): a
    // bare connect could reach another program holding the port.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], s3.s3_port));
    wait_ready(sup, "S3 server (SeaweedFS)", &s3.log_file, || {
        probe::http_get(addr, "/").is_some()
    })
}

/// `presenced provision` as the admin, as an operator runs it.
fn provision(s: &SitePlan, exe: &Path, sup: &mut Supervisor) -> Result<(), SandboxError> {
    let status = sup.run_once(
        &format!("{}-provision", s.site),
        exe,
        &[
            OsStr::new("provision"),
            OsStr::new("--config"),
            s.admin_config.as_os_str(),
            // The ownership table: stale flags and command replies.
            OsStr::new("--access"),
            s.keys.access_file.as_os_str(),
        ],
        &s.provision_log,
        READY_DEADLINE,
    )?;
    match status {
        Some(st) if st.success() => Ok(()),
        other => Err(SandboxError::Exited {
            what: format!("presenced provision of {}", s.site),
            status: other.map_or_else(|| "timed out".to_owned(), |st| st.to_string()),
            log: s.provision_log.clone(),
            tail: log_tail(&s.provision_log, 30),
        }),
    }
}

/// `presenced provision-hub` as the admin: every site's mirrors on the
/// hub, replicated on all three nodes.
fn provision_hub(plan: &Plan, exe: &Path, sup: &mut Supervisor) -> Result<(), SandboxError> {
    let servers = plan
        .hub
        .iter()
        .map(|h| h.client_url())
        .collect::<Vec<_>>()
        .join(",");
    let mut args: Vec<std::ffi::OsString> = vec![
        "provision-hub".into(),
        "--server".into(),
        servers.into(),
        "--replicas".into(),
        plan.hub.len().to_string().into(),
        "--nkey-seed-file".into(),
        plan.admin_seed.clone().into(),
    ];
    for s in &plan.sites {
        args.push("--site".into());
        args.push(s.site.as_str().into());
    }
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    // A restarted hub answers /healthz once its meta leader is back, but
    // the mirrors' own leaders may still be in election: retry a while.
    let start = Instant::now();
    loop {
        let status = sup.run_once(
            "hub-provision",
            exe,
            &args,
            &plan.hub_provision_log,
            READY_DEADLINE,
        )?;
        match status {
            Some(st) if st.success() => return Ok(()),
            other if start.elapsed() >= READY_DEADLINE => {
                return Err(SandboxError::Exited {
                    what: "presenced provision-hub".to_owned(),
                    status: other.map_or_else(|| "timed out".to_owned(), |st| st.to_string()),
                    log: plan.hub_provision_log.clone(),
                    tail: log_tail(&plan.hub_provision_log, 30),
                })
            }
            _ => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

fn simulator_target(
    s: &SitePlan,
    ids: &identities::Identities,
    index: usize,
    people: usize,
) -> simulator::Target {
    let cfg = plan::daemon_config(s, None).ok();
    let rooms = cfg.as_ref().map(plan::rooms).unwrap_or_default();
    let doors = cfg.as_ref().map(plan::rooms_with_door).unwrap_or_default();
    simulator::Target {
        site: s.site.as_str().to_owned(),
        mqtt_port: s.leaf.mqtt_port,
        user: plan::SIMULATOR_MQTT_USER.to_owned(),
        password: ids
            .sites
            .get(index)
            .map(|i| i.simulator_password.clone())
            .unwrap_or_default(),
        rooms,
        doors,
        people,
        seed: std::process::id() as u64 ^ ((index as u64 + 1) << 32),
        log: s.simulator_log.clone(),
    }
}

/// Until Ctrl-C, SIGTERM, the time limit, or a child's exit.
async fn wait_for_end(sup: &mut Supervisor, seconds: Option<u64>) -> Result<(), SandboxError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(SandboxError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(SandboxError::Runtime)?;
    let limit = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(limit);
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = int.recv() => { println!("sandbox: interrupted"); return Ok(()); }
            _ = term.recv() => { println!("sandbox: terminated"); return Ok(()); }
            () = &mut limit => { println!("sandbox: time is up"); return Ok(()); }
            _ = check.tick() => {
                if let Some(e) = sup.exited() {
                    return Err(e.into());
                }
            }
        }
    }
}

/// What runs where, and the commands to look at it.
fn summary(
    plan: &Plan,
    nats: &tools::NatsServerBin,
    weed: Option<&Path>,
    exe: &Path,
    sup: &Supervisor,
    people: usize,
) -> String {
    let running = sup.running();
    let pid = |name: &str| {
        running
            .iter()
            .find(|r| r.name == name)
            .map_or_else(|| "-".to_owned(), |r| r.pid.to_string())
    };
    let exe = exe.display();
    let mut o = String::new();
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "presenced sandbox: everything on 127.0.0.1, state and logs under {}",
        plan.dir.display()
    );
    let _ = writeln!(o, "nats-server {} ({})", nats.version, nats.path.display());
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "hub (JetStream domain hub, cluster of {}):",
        plan.hub.len()
    );
    for h in &plan.hub {
        let _ = writeln!(
            o,
            "  {:<8} pid {:<7} {}  leafnodes :{}  monitor http://{}  log {}",
            h.name,
            pid(&h.name),
            h.client_url(),
            h.leafnode_port,
            h.monitor_addr(),
            h.log_file.display()
        );
    }
    for s in &plan.sites {
        let leaf = format!("{}-leaf", s.site);
        let daemon = format!("{}-presenced", s.site);
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "site {} (JetStream domain {}):",
            s.site,
            s.site.leaf_domain()
        );
        let _ = writeln!(
            o,
            "  leaf      pid {:<7} {}  mqtt 127.0.0.1:{}  monitor http://{}  log {}",
            pid(&leaf),
            s.leaf.client_url(),
            s.leaf.mqtt_port,
            s.leaf.monitor_addr(),
            s.leaf.log_file.display()
        );
        let _ = writeln!(
            o,
            "  presenced pid {:<7} http://{}/healthz  config {}  log {}",
            pid(&daemon),
            s.http_addr(),
            s.daemon_config.display(),
            s.daemon_log.display()
        );
        let _ = writeln!(
            o,
            "  simulator (in the sandbox process): {people} people, MQTT to 127.0.0.1:{}, log {}, true occupancy (labels for presenced tune) {}",
            s.leaf.mqtt_port,
            s.simulator_log.display(),
            simulator::labels_path(&s.simulator_log).display()
        );
        let _ = writeln!(
            o,
            "  identities: access map {}, ACL {}, seeds in {}",
            s.keys.access_file.display(),
            s.leaf.authorization_path.display(),
            s.keys
                .service_seed
                .parent()
                .map_or_else(String::new, |p| p.display().to_string())
        );
    }
    let _ = writeln!(o);
    match (&plan.s3, weed) {
        (Some(s3), Some(weed)) => {
            let _ = writeln!(
                o,
                "archive: S3 (SeaweedFS, {}) pid {} at {}, bucket {}, a snapshot per site every {}; log {}",
                weed.display(),
                pid("s3"),
                s3.endpoint(),
                s3.bucket,
                plan::SNAPSHOT_EVERY,
                s3.log_file.display()
            );
            if let Some(s) = plan.sites.first() {
                let _ = writeln!(
                    o,
                    "  list them:  {exe} snapshots --config {}",
                    s.admin_config.display()
                );
                let _ = writeln!(
                    o,
                    "  restore:    {exe} restore --config CONFIG SNAPSHOT [--from-s3] --access {}   (as an identity with runs = [\"restore\"] in the access map; signature, sha256 and every right checked first; a leaf that is not empty, as this running one, is refused without --force)",
                    s.keys.access_file.display()
                );
            }
        }
        _ => {
            let _ = writeln!(
                o,
                "archive: off; SeaweedFS (`weed`) was not found for a local S3 server. Get it with:\n  {}",
                tools::HOW_TO_GET_WEED
            );
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "Watch zones change, from another terminal:");
    for s in &plan.sites {
        let _ = writeln!(
            o,
            "  {} on its leaf: {exe} watch --config {}",
            s.site,
            s.admin_config.display()
        );
        let _ = writeln!(
            o,
            "  {} on the hub:  {}",
            s.site,
            hub_watch(s, &exe.to_string())
        );
    }
    if let Some(s) = plan.sites.first() {
        let _ = writeln!(
            o,
            "Command a zone as the operator (the identity granted `commands`):\n  {exe} cmd override <zone> occupied --for 30m --config {}",
            s.operator_config.display()
        );
        let _ = writeln!(
            o,
            "Hub mirror health as the service (through the site's link):\n  {exe} status --config {}",
            s.daemon_config.display()
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Health of a whole site (exit 0 healthy, 1 degraded, 2 down; --json for details):"
    );
    for s in &plan.sites {
        let _ = writeln!(
            o,
            "  {}: {exe} status --config {}",
            s.site,
            s.admin_config.display()
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Inspect with the nats CLI as the admin (reads everything, writes no keyspace); seed {}:",
        plan.admin_seed.display()
    );
    if let Some(s) = plan.sites.first() {
        let _ = writeln!(
            o,
            "  nats --server {} --nkey {} kv ls",
            s.leaf.client_url(),
            plan.admin_seed.display()
        );
        let _ = writeln!(
            o,
            "  nats --server {} --nkey {} kv get presence hall",
            s.leaf.client_url(),
            plan.admin_seed.display()
        );
    }
    if let Some(h) = plan.hub.first() {
        let _ = writeln!(
            o,
            "  nats --server {} --nkey {} stream ls",
            h.client_url(),
            plan.admin_seed.display()
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "PIDs: {}    Ctrl-C stops everything.",
        plan.pids_file.display()
    );
    o
}

/// The command that follows a site's zones on the hub.
fn hub_watch(s: &SitePlan, exe: &str) -> String {
    format!(
        "{exe} watch --config {} --hub --site {}",
        s.hub_admin_config.display(),
        s.site
    )
}
