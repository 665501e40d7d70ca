//! The sandbox's child processes: started so that they cannot outlive it,
//! stopped in reverse order of start, every PID written down.
//!
//! Each child runs in its own process group, so a Ctrl-C in the terminal
//! reaches the sandbox alone and the sandbox decides the order of shutdown
//! (daemons before their leaf, leaves before the hub). Each child also asks
//! the kernel for SIGKILL when the sandbox dies (`PR_SET_PDEATHSIG`), so
//! even a SIGKILLed sandbox leaves nothing behind. Children must be spawned
//! from the main thread: the death signal follows the thread that forked.

use presenced_procs::{ProcError, Supervised};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("cannot write the PID file {path}: {source}")]
    Pids {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One started child.
#[derive(Debug)]
struct Managed {
    /// Children of one tier stop together; higher tiers stop first.
    tier: u8,
    process: Supervised,
    /// Shorter than the tier's grace for servers known to linger.
    grace: Option<Duration>,
}

/// A process the sandbox runs, as shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
}

/// Owns the children; kills whatever is left when dropped (each
/// [`Supervised`] kills its child on `Drop`).
#[derive(Debug)]
pub struct Supervisor {
    children: Vec<Managed>,
    pids_file: PathBuf,
}

impl Supervisor {
    pub fn new(pids_file: PathBuf) -> Supervisor {
        Supervisor {
            children: Vec::new(),
            pids_file,
        }
    }

    /// Starts `program args` with stdout and stderr appended to `log`, in
    /// its own process group and tied to the sandbox's life
    /// ([`Supervised::detached`]).
    pub fn spawn(
        &mut self,
        name: &str,
        tier: u8,
        program: &Path,
        args: &[&std::ffi::OsStr],
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<u32, SuperviseError> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut process = Supervised::new(name, log).detached();
        let pid = process.spawn(cmd, true)?;
        self.children.push(Managed {
            tier,
            process,
            grace: None,
        });
        self.write_pids()?;
        Ok(pid)
    }

    /// Runs `program args` to completion (e.g. `presenced provision`),
    /// under the same rules as the long-running children, up to `deadline`.
    pub fn run_once(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&std::ffi::OsStr],
        log: &Path,
        deadline: Duration,
    ) -> Result<Option<ExitStatus>, SuperviseError> {
        self.spawn(name, u8::MAX, program, args, log, &[])?;
        let Some(mut m) = self.children.pop() else {
            return Ok(None);
        };
        let status = m.process.wait_exit(deadline);
        self.write_pids()?;
        Ok(status)
    }

    /// Gives the child `pid` at most `grace` to stop after SIGTERM.
    pub fn set_stop_grace(&mut self, pid: u32, grace: Duration) {
        if let Some(m) = self.children.iter_mut().find(|m| m.process.pid() == pid) {
            m.grace = Some(grace);
        }
    }

    /// Every running child.
    pub fn running(&self) -> Vec<Running> {
        self.children
            .iter()
            .map(|m| Running {
                name: m.process.what().to_owned(),
                pid: m.process.pid(),
                log: m.process.log_path().to_owned(),
            })
            .collect()
    }

    /// The first child that has exited on its own: its name, status, log
    /// tail, and the log line if a port it was to listen on was taken.
    pub fn exited(&mut self) -> Option<ProcError> {
        self.children.iter_mut().find_map(|m| m.process.exited())
    }

    /// Stops every child, highest tier first: SIGTERM to the whole tier,
    /// SIGKILL to whatever still runs after `grace`; every child is reaped.
    pub fn stop_all(&mut self, grace: Duration) {
        let mut tiers: Vec<u8> = self.children.iter().map(|m| m.tier).collect();
        tiers.sort_unstable();
        tiers.dedup();
        for tier in tiers.into_iter().rev() {
            let (mut stopping, rest): (Vec<Managed>, Vec<Managed>) =
                std::mem::take(&mut self.children)
                    .into_iter()
                    .partition(|m| m.tier == tier);
            self.children = rest;
            for m in &stopping {
                m.process.signal(libc::SIGTERM);
            }
            let start = Instant::now();
            for m in &mut stopping {
                let own = m.grace.map_or(grace, |g| g.min(grace));
                let left = own.saturating_sub(start.elapsed());
                let (name, pid) = (m.process.what().to_owned(), m.process.pid());
                match m.process.terminate_within(left) {
                    Some(status) => tracing::debug!(name, pid, %status, "stopped"),
                    None if m.grace.is_some() => {
                        tracing::debug!(name, pid, "killed after its short grace");
                        m.process.kill();
                    }
                    None => {
                        tracing::warn!(name, pid, "did not stop in time; killed");
                        m.process.kill();
                    }
                }
            }
        }
        let _ = self.write_pids();
    }

    fn write_pids(&self) -> Result<(), SuperviseError> {
        let mut text = String::new();
        for m in &self.children {
            text.push_str(&format!("{} {}\n", m.process.pid(), m.process.what()));
        }
        let tmp = self.pids_file.with_extension("tmp");
        std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &self.pids_file))
            .map_err(|source| SuperviseError::Pids {
                path: self.pids_file.clone(),
                source,
            })
    }
}

/// The last `lines` lines of a log, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    presenced_procs::log_tail(path, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks the pid.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    }

    #[test]
    fn children_are_listed_stopped_in_tiers_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Supervisor::new(dir.path().join("pids"));
        let log = dir.path().join("log");
        let sleep = Path::new("/bin/sleep");
        let a = s.spawn("a", 0, sleep, &["30".as_ref()], &log, &[]).unwrap();
        let b = s.spawn("b", 1, sleep, &["30".as_ref()], &log, &[]).unwrap();
        let pids = std::fs::read_to_string(dir.path().join("pids")).unwrap();
        assert_eq!(pids, format!("{a} a\n{b} b\n"));
        assert_eq!(s.running().len(), 2);
        assert!(s.exited().is_none());
        s.stop_all(Duration::from_secs(5));
        assert!(!alive(a) && !alive(b));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pids")).unwrap(),
            ""
        );
    }

    #[test]
    fn a_child_that_exits_is_reported_and_run_once_waits() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Supervisor::new(dir.path().join("pids"));
        let log = dir.path().join("log");
        s.spawn("t", 0, Path::new("/bin/true"), &[], &log, &[])
            .unwrap();
        let start = Instant::now();
        let mut exited = None;
        while exited.is_none() && start.elapsed() < Duration::from_secs(10) {
            exited = s.exited();
        }
        assert!(
            matches!(&exited, Some(ProcError::Exited { what, .. }) if what == "t"),
            "{exited:?}"
        );
        let status = s
            .run_once(
                "false",
                Path::new("/bin/false"),
                &[],
                &log,
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(status.map(|s| s.success()), Some(false));
        assert_eq!(s.running().len(), 1);
    }
}
