//! A Mosquitto broker on a free loopback port, configured the way the
//! daemon's broker must be: no silent drops of queued QoS 1 messages.

use super::free_port;
use super::nats::find_on_path;
use super::process::{self, log_tail};
use std::env;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
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
    log_path: PathBuf,
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
        let dir = tempfile::Builder::new()
            .prefix("mosquitto-test-")
            .tempdir()
            .expect("create a temp dir for mosquitto");
        let port = free_port();
        let config_path = dir.path().join("mosquitto.conf");
        let log_path = dir.path().join("mosquitto.log");
        let pid_path = dir.path().join("mosquitto.pid");
        let config = render_config(port, &pid_path, &log_path, extra, running_as_root());
        std::fs::write(&config_path, config).expect("write mosquitto config");
        let mut broker = Mosquitto {
            port,
            process: process::Supervised::new("mosquitto", log_path.clone()),
            config_path,
            log_path,
            dir,
        };
        broker.spawn();
        broker
    }

    /// The listener address.
    /// Process id of the running server (0 when stopped), for /proc
    /// readings in benchmarks.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

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
        self.spawn();
    }

    /// Whether the broker process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The broker log so far (all runs).
    pub fn log(&self) -> String {
        self.process.log()
    }

    fn spawn(&mut self) {
        let bin = mosquitto_bin();
        assert!(
            bin.exists(),
            "{} not found (run scripts/setup.sh, or set MOSQUITTO)",
            bin.display()
        );
        let mut command = Command::new(&bin);
        command.arg("-c").arg(&self.config_path);
        // It writes its own log (log_dest file in the config).
        self.process.spawn(command, false);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        let addr = self.addr();
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            self.process.panic_if_exited("during startup");
            if start.elapsed() >= READY_DEADLINE {
                panic!(
                    "mosquitto on port {} not accepting after {READY_DEADLINE:?}; log tail:\n{}",
                    self.port,
                    log_tail(&self.log_path)
                );
            }
            std::thread::sleep(super::wait::POLL);
        }
    }
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
