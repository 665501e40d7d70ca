//! The `presenced` binary under test, run as an operator would run it.

use super::http_get;
use super::process::{self, Harnessed as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const TERMINATE_DEADLINE: Duration = Duration::from_secs(15);
const DEFAULT_RUST_LOG: &str = "info,presenced=debug";

/// The binary Cargo built for this test run.
pub fn presenced_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_presenced"))
}

/// Runs a one-shot subcommand (`provision`, `check-config`, `get`, ...)
/// to completion, with the same `RUST_LOG` default as [`Daemon`].
pub fn run_presenced(args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(presenced_bin());
    command.args(args).stdin(Stdio::null());
    apply_env(&mut command, extra_env);
    command
        .output()
        .unwrap_or_else(|error| panic!("cannot run presenced {args:?}: {error}"))
}

/// `presenced run` in the background; SIGKILLed on `Drop`.
pub struct Daemon {
    /// The config the daemon runs with; reused by [`Daemon::restart`].
    pub config_path: PathBuf,
    process: process::Supervised,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    /// Run under `unshare` (see [`Daemon::start_in_own_pid_namespace`]).
    wrapper: bool,
    // Last field: removed after the daemon is gone.
    dir: TempDir,
}

impl Daemon {
    /// Writes `config_toml` to a temp file and runs the daemon with it.
    pub fn start(config_toml: &str, extra_env: &[(&str, &str)]) -> Daemon {
        let dir = new_dir();
        let config_path = dir.path().join("presenced.toml");
        std::fs::write(&config_path, config_toml).expect("write presenced config");
        Daemon::launch(dir, config_path, extra_env)
    }

    /// Provisions the site of `config_toml` with the real CLI, then runs
    /// the daemon on it and waits until `/healthz` on `http_port` answers
    /// 200: how most tests start one.
    pub fn start_provisioned(config_toml: &str, http_port: u16) -> Daemon {
        let dir = new_dir();
        let config_path = dir.path().join("presenced.toml");
        std::fs::write(&config_path, config_toml).expect("write presenced config");
        let path = config_path.to_str().expect("a UTF-8 temp path");
        let out = run_presenced(&["provision", "--config", path], &[]);
        assert!(
            out.status.success(),
            "provision failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let daemon = Daemon::launch(dir, config_path, &[]);
        daemon.wait_healthy(
            SocketAddr::from(([127, 0, 0, 1], http_port)),
            Duration::from_secs(20),
        );
        daemon
    }

    /// Runs the daemon with an existing config file, which the caller
    /// keeps alive (e.g. across several daemons in a crash test).
    pub fn start_at(config_path: &Path, extra_env: &[(&str, &str)]) -> Daemon {
        Daemon::launch(new_dir(), config_path.to_path_buf(), extra_env)
    }

    /// [`Daemon::start_at`] in a PID namespace of its own (`unshare
    /// --pid --fork --kill-child`, as root): another container, as far as
    /// the process can tell. [`Daemon::kill9`] kills `unshare`, which
    /// takes the daemon with it.
    pub fn start_in_own_pid_namespace(config_path: &Path) -> Daemon {
        let mut d = Daemon::launch_with(new_dir(), config_path.to_path_buf(), &[], false);
        d.wrapper = true;
        d.spawn();
        d
    }

    fn launch(dir: TempDir, config_path: PathBuf, extra_env: &[(&str, &str)]) -> Daemon {
        Daemon::launch_with(dir, config_path, extra_env, true)
    }

    fn launch_with(
        dir: TempDir,
        config_path: PathBuf,
        extra_env: &[(&str, &str)],
        spawn: bool,
    ) -> Daemon {
        let log_path = dir.path().join("presenced.log");
        let mut daemon = Daemon {
            config_path,
            process: process::Supervised::new("presenced", log_path.clone()),
            log_path,
            env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: false,
            dir,
        };
        if spawn {
            daemon.spawn();
        }
        daemon
    }

    fn spawn(&mut self) {
        let mut command = if self.wrapper {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--kill-child"])
                .arg(presenced_bin());
            c
        } else {
            Command::new(presenced_bin())
        };
        command.arg("run").arg("--config").arg(&self.config_path);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        apply_env(&mut command, &env);
        self.process.start(command, true);
    }

    /// SIGKILL and reap: a crash at an arbitrary instant.
    pub fn kill9(&mut self) {
        self.process.kill();
    }

    /// SIGTERM and wait for the exit (a graceful shutdown); panics with the
    /// log tail if the daemon is still running after 15 s.
    pub fn terminate(&mut self) -> ExitStatus {
        if self.process.pid() == 0 {
            panic!("presenced is not running; log tail:\n{}", self.log_tail());
        }
        match self.process.terminate_within(TERMINATE_DEADLINE) {
            Some(status) => status,
            None => {
                self.process.kill();
                panic!(
                    "presenced still running {TERMINATE_DEADLINE:?} after SIGTERM; log tail:\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// Starts the daemon again with the same config, environment and log
    /// (appended); kills the running one first, if any.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The daemon's process id (for /proc readings in benchmarks).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether the process is alive (false once it exited by itself).
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The exit status if the daemon exited by itself.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.process.exit_status()
    }

    /// Everything the daemon wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The last lines of the log, for panic messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Polls `GET /healthz` on `http` until it answers 200; panics with the
    /// log tail on timeout.
    pub fn wait_healthy(&self, http: SocketAddr, deadline: Duration) {
        let start = Instant::now();
        loop {
            let last = http_get(http, "/healthz");
            if let Some((200, _)) = last {
                return;
            }
            if start.elapsed() >= deadline {
                panic!(
                    "presenced not healthy on {http} after {deadline:?}; last /healthz: {last:?}; log tail:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(super::wait::POLL);
        }
    }

    /// Waits until the log contains `needle`; panics with the tail if not.
    pub fn wait_for_log(&self, needle: &str, deadline: Duration) {
        let start = Instant::now();
        loop {
            if self.log().contains(needle) {
                return;
            }
            if start.elapsed() >= deadline {
                panic!(
                    "presenced log has no {needle:?} after {deadline:?}; log tail:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(super::wait::POLL);
        }
    }

    /// The daemon's temp dir, for files a test wants to keep beside it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn new_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("presenced-test-")
        .tempdir()
        .expect("create a temp dir for presenced")
}

fn apply_env(command: &mut Command, extra_env: &[(&str, &str)]) {
    if std::env::var_os("RUST_LOG").is_none() && !extra_env.iter().any(|(k, _)| *k == "RUST_LOG") {
        command.env("RUST_LOG", DEFAULT_RUST_LOG);
    }
    for (key, value) in extra_env {
        command.env(key, value);
    }
}
