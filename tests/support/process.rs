//! Child-process plumbing shared by the server and daemon wrappers.

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
