//! Child processes of the harness: [`Supervised`], the one type every
//! server wrapper and the daemon hold, and the signal helpers under it.

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Lines of a log shown when a server or the daemon misbehaves.
pub const TAIL_LINES: usize = 60;

/// Sends `signal` to the child; a child that already exited is fine.
pub fn signal(child: &Child, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own
    // child, not yet reaped (we hold its `Child`), so it cannot be recycled.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Waits for the child to exit, up to `deadline`; `None` if it is still
/// running then.
pub fn wait_for_exit(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(super::wait::POLL);
    }
}

/// SIGTERM, then SIGKILL if the child has not exited within `grace`.
pub fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    signal(child, libc::SIGTERM);
    if let Some(status) = wait_for_exit(child, grace) {
        return status;
    }
    kill(child)
}

/// SIGKILL and reap.
pub fn kill(child: &mut Child) -> ExitStatus {
    signal(child, libc::SIGKILL);
    child.wait().expect("wait for a killed child")
}

/// The whole file, or a note saying why it could not be read.
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|error| format!("<cannot read {}: {error}>", path.display()))
}

/// The last [`TAIL_LINES`] lines of a log file, for panic messages.
pub fn log_tail(path: &Path) -> String {
    let log = read_log(path);
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(TAIL_LINES);
    lines[from..].join("\n")
}

/// One child of the harness, the same for nats-server, Mosquitto,
/// SeaweedFS and the daemon: started from a command (its output appended
/// to the log, or discarded when the program writes its own log there),
/// stopped gracefully or killed, started again, reaped; killed on `Drop`,
/// so a failing test leaves nothing running.
pub struct Supervised {
    /// What it is, for messages ("nats-server", "presenced", ...).
    what: &'static str,
    log_path: std::path::PathBuf,
    child: Option<Child>,
}

impl Supervised {
    /// Nothing running yet; `log_path` is where its output goes.
    pub fn new(what: &'static str, log_path: std::path::PathBuf) -> Supervised {
        Supervised {
            what,
            log_path,
            child: None,
        }
    }

    /// Starts `command`; with `capture_output`, its stdout and stderr are
    /// appended to the log, else discarded (the program writes the log).
    pub fn spawn(&mut self, mut command: std::process::Command, capture_output: bool) {
        use std::process::Stdio;
        assert!(self.child.is_none(), "{} is still running", self.what);
        command.stdin(Stdio::null());
        if capture_output {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
            let err = log.try_clone().expect("clone a log file handle");
            command.stdout(log).stderr(err);
        } else {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = command.spawn().unwrap_or_else(|error| {
            panic!(
                "cannot start {} ({}): {error}",
                self.what,
                command.get_program().to_string_lossy()
            )
        });
        self.child = Some(child);
    }

    /// Process id (0 when not running), for signals and /proc readings.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is alive (false once it exited by itself).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The exit status if it exited by itself.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok()?)
    }

    /// Panics with the log tail if the process has exited: for loops that
    /// wait for it to come up.
    pub fn panic_if_exited(&mut self, during: &str) {
        if let Some(status) = self.exit_status() {
            self.child = None;
            panic!(
                "{} exited {during} ({status}); log tail:\n{}",
                self.what,
                log_tail(&self.log_path)
            );
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        Some(terminate(&mut child, grace))
    }

    /// SIGTERM and up to `deadline` for the exit; `None` (and still
    /// running) if it did not exit.
    pub fn terminate_within(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        signal(child, libc::SIGTERM);
        let status = wait_for_exit(child, deadline)?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL and reap: a crash at an arbitrary instant.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child);
        }
    }

    /// Everything in the log so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// The last lines of the log, for panic messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill();
    }
}
