//! A Mosquitto broker on a free loopback port, configured the way the
//! daemon's broker must be: no silent drops of queued QoS 1 messages.
//!
//! Mosquitto cannot listen on port 0 and report the port, so one is
//! picked; when another program took it first, Mosquitto says `Address
//! already in use` and exits, and the broker is started again on a fresh
//! port ([`presenced_procs::retry_on_taken_port`]). Ready means this run
//! logged `running` (its listeners are open) and still runs: a connect
//! alone could reach whoever holds the port.

use super::nats::find_on_path;
use super::process::{self, ProcError};
use presenced_procs::{free_port, retry_on_taken_port};
use std::env;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

const READY_DEADLINE: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `$MOSQUITTO`, else `mosquitto` on `PATH`, else the Debian location
/// (`/usr/sbin` is often not on a non-root user's `PATH`).
pub fn mosquitto_bin() -> PathBuf {
    env::var_os("MOSQUITTO")
        .map(PathBuf::from)
        .or_else(|| find_on_path("mosquitto"))
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/mosquitto"))
}

/// A running Mosquitto; killed and its directory removed on `Drop`.
pub struct Mosquitto {
    /// Listener port on 127.0.0.1.
    pub port: u16,
    process: process::Supervised,
    config_path: PathBuf,
    // Last field: removed after the broker is gone.
    dir: TempDir,
}

impl Mosquitto {
    /// The broker as the daemon expects it (`max_queued_messages 0`).
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("")
    }

    /// Same, with extra config lines; a line whose option is one of the
    /// defaults replaces that default (e.g. `max_queued_messages 1000` to
    /// reproduce Mosquitto's stock queue limit).
    pub fn start_with(extra: &str) -> Mosquitto {
        Mosquitto::start_first_on(extra, None)
    }

    /// [`Mosquitto::start_with`], trying port `first` before any picked
    /// one: a test holds a port, hands it here, and sees the broker start
    /// on another.
    pub fn start_first_on(extra: &str, first: Option<u16>) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("mosquitto-test-")
            .tempdir()
            .expect("create a temp dir for mosquitto");
        let config_path = dir.path().join("mosquitto.conf");
        let log_path = dir.path().join("mosquitto.log");
        let pid_path = dir.path().join("mosquitto.pid");
        let mut process = process::Supervised::new("mosquitto", log_path.clone());
        let bin = mosquitto_bin();
        assert!(
            bin.exists(),
            "{} not found (run scripts/setup.sh, or set MOSQUITTO)",
            bin.display()
        );
        let port = retry_on_taken_port(
            |attempt| {
                let port = first.filter(|_| attempt == 1).unwrap_or_else(free_port);
                let config = render_config(port, &pid_path, &log_path, extra, running_as_root());
                std::fs::write(&config_path, config).expect("write mosquitto config");
                let mut command = Command::new(&bin);
                command.arg("-c").arg(&config_path);
                // It writes its own log (log_dest file in the config); what
                // it says before opening it goes there too.
                process.spawn(command, true)?;
                wait_ready(&mut process)?;
                Ok::<u16, ProcError>(port)
            },
            ProcError::port_taken,
            |_, why| eprintln!("mosquitto: {why}; starting again on a fresh port"),
        )
        .unwrap_or_else(|error| panic!("{error}"));
        Mosquitto {
            port,
            process,
            config_path,
            dir,
        }
    }

    /// Process id of the running server (0 when stopped), for /proc
    /// readings in benchmarks.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The listener address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Graceful stop: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        self.process.stop(STOP_GRACE);
    }

    /// Abrupt stop.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Stops (if running) and starts again on the same port. Sessions are
    /// lost: the broker runs without persistence.
    pub fn restart(&mut self) {
        self.stop();
        let started = self
            .process
            .respawn()
            .and_then(|_| wait_ready(&mut self.process));
        if let Err(error) = started {
            panic!("mosquitto restart on port {}: {error}", self.port);
        }
    }

    /// Whether the broker process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The broker log so far (all runs).
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// Until this run logged that it runs (after opening its listeners).
fn wait_ready(process: &mut process::Supervised) -> Result<(), ProcError> {
    process.wait_ready(READY_DEADLINE, |p| {
        p.log_of_this_run()
            .lines()
            .any(|l| l.contains("mosquitto version") && l.ends_with(" running"))
    })
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Started as root, Mosquitto switches to user `mosquitto`, which cannot
/// write the root-owned temp dir; `user root` keeps it as the test's user.
/// As any other user the option is ignored and files are ours anyway.
fn render_config(port: u16, pid: &Path, log: &Path, extra: &str, as_root: bool) -> String {
    let mut defaults = vec![
        format!("listener {port} 127.0.0.1"),
        "allow_anonymous true".to_string(),
        "max_queued_messages 0".to_string(),
        // presenced acks only after JetStream stored a message; the
        // default window of 20 unacked messages would cap throughput.
        "max_inflight_messages 1000".to_string(),
        "persistence false".to_string(),
        format!("pid_file {}", pid.display()),
        format!("log_dest file {}", log.display()),
    ];
    if as_root {
        defaults.push("user root".to_string());
    }
    let overridden: Vec<&str> = extra
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    let mut config: Vec<String> = defaults
        .into_iter()
        .filter(|line| {
            let key = line.split_whitespace().next().unwrap_or_default();
            // `listener` may legitimately appear several times.
            key == "listener" || !overridden.contains(&key)
        })
        .collect();
    config.extend(extra.lines().map(str::to_string));
    config.join("\n") + "\n"
}
