//! The sandbox's child processes: started so that they cannot outlive it,
//! stopped in reverse order of start, every PID written down.
//!
//! Each child runs in its own process group, so a Ctrl-C in the terminal
//! reaches the sandbox alone and the sandbox decides the order of shutdown
//! (daemons before their leaf, leaves before the hub). Each child also asks
//! the kernel for SIGKILL when the sandbox dies (`PR_SET_PDEATHSIG`), so
//! even a SIGKILLed sandbox leaves nothing behind. Children must be spawned
//! from the main thread: the death signal follows the thread that forked.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot open log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        source: std::io::Error,
    },
    #[error("cannot write the PID file {path}: {source}")]
    Pids {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One started child.
#[derive(Debug)]
struct Managed {
    name: String,
    /// Children of one tier stop together; higher tiers stop first.
    tier: u8,
    log: PathBuf,
    child: Child,
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

/// Owns the children; kills whatever is left when dropped.
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

    /// Starts `program args` with stdout and stderr appended to `log`.
    pub fn spawn(
        &mut self,
        name: &str,
        tier: u8,
        program: &Path,
        args: &[&std::ffi::OsStr],
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<u32, SuperviseError> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| SuperviseError::Log {
                path: log.to_owned(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| SuperviseError::Log {
            path: log.to_owned(),
            source,
        })?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: getpid is async-signal-safe and called before the fork.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (setpgid, prctl, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                libc::setpgid(0, 0);
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The sandbox may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| SuperviseError::Spawn {
            name: name.to_owned(),
            program: program.display().to_string(),
            source,
        })?;
        let pid = child.id();
        tracing::debug!(name, pid, log = %log.display(), "started");
        self.children.push(Managed {
            name: name.to_owned(),
            tier,
            log: log.to_owned(),
            child,
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
        let status = wait_for_exit(&mut m.child, deadline);
        if status.is_none() {
            kill(&mut m.child);
        }
        self.write_pids()?;
        Ok(status)
    }

    /// Gives the child `pid` at most `grace` to stop after SIGTERM.
    pub fn set_stop_grace(&mut self, pid: u32, grace: Duration) {
        if let Some(m) = self.children.iter_mut().find(|m| m.child.id() == pid) {
            m.grace = Some(grace);
        }
    }

    /// Every running child.
    pub fn running(&self) -> Vec<Running> {
        self.children
            .iter()
            .map(|m| Running {
                name: m.name.clone(),
                pid: m.child.id(),
                log: m.log.clone(),
            })
            .collect()
    }

    /// The first child that has exited on its own, with its status.
    pub fn exited(&mut self) -> Option<(String, ExitStatus, PathBuf)> {
        for m in &mut self.children {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Some((m.name.clone(), status, m.log.clone()));
            }
        }
        None
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
                signal(&m.child, libc::SIGTERM);
            }
            let start = Instant::now();
            for m in &mut stopping {
                let own = m.grace.map_or(grace, |g| g.min(grace));
                let left = own.saturating_sub(start.elapsed());
                match wait_for_exit(&mut m.child, left) {
                    Some(status) => {
                        tracing::debug!(name = %m.name, pid = m.child.id(), %status, "stopped")
                    }
                    None if m.grace.is_some() => {
                        tracing::debug!(name = %m.name, pid = m.child.id(), "killed after its short grace");
                        kill(&mut m.child);
                    }
                    None => {
                        tracing::warn!(name = %m.name, pid = m.child.id(), "did not stop in time; killed");
                        kill(&mut m.child);
                    }
                }
            }
        }
        let _ = self.write_pids();
    }

    fn write_pids(&self) -> Result<(), SuperviseError> {
        let mut text = String::new();
        for m in &self.children {
            text.push_str(&format!("{} {}\n", m.child.id(), m.name));
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

impl Drop for Supervisor {
    fn drop(&mut self) {
        for m in &mut self.children {
            kill(&mut m.child);
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions; the child is
        // not yet reaped (we hold its Child), so the pid is still ours.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn kill(child: &mut Child) {
    signal(child, libc::SIGKILL);
    let _ = child.wait();
}

fn wait_for_exit(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
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
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `lines` lines of a log, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
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
        assert_eq!(exited.map(|e| e.0).as_deref(), Some("t"));
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
