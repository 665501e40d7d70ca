//! Child processes of the harness: [`Supervised`] from the
//! `presenced-procs` crate (the sandbox's too), with the tests' way of
//! failing: a panic that shows the log tail.

use std::path::Path;
use std::process::{Child, Command};

pub use presenced_procs::{read_log, ProcError, Supervised, TAIL_LINES};

/// The last [`TAIL_LINES`] lines of a log file, for panic messages.
pub fn log_tail(path: &Path) -> String {
    presenced_procs::log_tail(path, TAIL_LINES)
}

/// SIGKILL and reap a child a test spawned itself.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// What the test harness does with a [`Supervised`]: the same calls, but
/// a child that cannot start is a panic with its log.
pub trait Harnessed {
    /// Starts `command` (see [`Supervised::spawn`]); panics if it cannot.
    fn start(&mut self, command: Command, capture_output: bool);
    /// Panics with the log tail if the process has exited: for loops that
    /// wait for it to come up.
    fn panic_if_exited(&mut self, during: &str);
}

impl Harnessed for Supervised {
    fn start(&mut self, command: Command, capture_output: bool) {
        if let Err(error) = self.spawn(command, capture_output) {
            panic!("{error}");
        }
    }

    fn panic_if_exited(&mut self, during: &str) {
        if let Some(error) = self.exited() {
            panic!("{during}: {error}");
        }
    }
}

/// (RSS in KiB, CPU seconds used so far) of a process, from /proc.
/// Resident memory of `pid` in KiB: anonymous (heap, stacks) and file
/// backed (mostly the binary's code pages, clean and shared).
pub fn proc_rss_split(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:"))
}

pub fn proc_usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (rss, ticks as f64 / hz)
}
