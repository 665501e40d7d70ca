//! [`Supervised`]: the one child-process type of the sandbox, the tests and
//! the benches.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Lines of a log shown when a server misbehaves.
pub const TAIL_LINES: usize = 60;

/// How often a readiness probe or an exit is re-checked: short enough not
/// to slow starts, long enough not to steal a small machine's cores from
/// the servers being waited for.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot open log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {what} ({program}): {source}")]
    Spawn {
        what: String,
        program: String,
        source: std::io::Error,
    },
    #[error("{what} exited ({status}); last lines of {log}:\n{tail}", log = .log.display())]
    Exited {
        what: String,
        status: String,
        log: PathBuf,
        tail: String,
        /// The log line saying a port it was to listen on was taken.
        taken: Option<String>,
    },
    #[error("{what} did not become ready within {secs} s; last lines of {log}:\n{tail}", log = .log.display())]
    NotReady {
        what: String,
        secs: u64,
        log: PathBuf,
        tail: String,
        taken: Option<String>,
    },
}

impl ProcError {
    /// When the child failed because a port it was to listen on was taken
    /// (so that a start on fresh ports may succeed): which child and the
    /// log line that says so. Found in the child's whole log of this run,
    /// not only the tail (a Go server's fatal line is followed by stacks).
    pub fn port_taken(&self) -> Option<String> {
        match self {
            ProcError::Exited { what, taken, .. } | ProcError::NotReady { what, taken, .. } => {
                taken.as_ref().map(|line| format!("{what}: {line}"))
            }
            _ => None,
        }
    }
}

/// The whole file, or a note saying why it could not be read.
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|error| format!("<cannot read {}: {error}>", path.display()))
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let log = read_log(path);
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How to start the child again: what [`Supervised::spawn`] was given.
#[derive(Debug, Clone)]
struct Recipe {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    dir: Option<PathBuf>,
    capture: bool,
}

impl Recipe {
    fn of(command: &Command, capture: bool) -> Recipe {
        Recipe {
            program: command.get_program().to_owned(),
            args: command.get_args().map(ToOwned::to_owned).collect(),
            env: command
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
                .collect(),
            dir: command.get_current_dir().map(Path::to_path_buf),
            capture,
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for (key, value) in &self.env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        command
    }
}

/// One child: nats-server, Mosquitto, SeaweedFS or the daemon. Started
/// from a command (its output appended to the log, or discarded when the
/// program writes its own log there), waited for with a deadline that
/// fails early if it exits, stopped gracefully or killed, started again
/// with the same command, reaped; killed on `Drop`, so a failing test or
/// a sandbox error leaves nothing running.
#[derive(Debug)]
pub struct Supervised {
    /// What it is, for messages ("nats-server", "hub-1", ...).
    what: String,
    log_path: PathBuf,
    child: Option<Child>,
    recipe: Option<Recipe>,
    /// Length of the log when the running child started: its lines follow.
    log_start: u64,
    /// Own process group and a death signal (see [`Supervised::detached`]).
    detached: bool,
}

impl Supervised {
    /// Nothing running yet; `log_path` is where its output goes.
    pub fn new(what: impl Into<String>, log_path: impl Into<PathBuf>) -> Supervised {
        Supervised {
            what: what.into(),
            log_path: log_path.into(),
            child: None,
            recipe: None,
            log_start: 0,
            detached: false,
        }
    }

    /// The child runs in its own process group, so a Ctrl-C in the
    /// terminal reaches the parent alone and the parent decides the order
    /// of shutdown; and the kernel SIGKILLs it when the parent dies
    /// (`PR_SET_PDEATHSIG`), so even a SIGKILLed parent leaves nothing
    /// behind. The death signal follows the thread that forked: spawn from
    /// a thread that lives as long as the child should (the main thread).
    pub fn detached(mut self) -> Supervised {
        self.detached = true;
        self
    }

    /// What it is, as given to [`Supervised::new`].
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Starts `command`; with `capture`, its stdout and stderr are appended
    /// to the log, else discarded (the program writes the log itself).
    /// Returns the process id.
    pub fn spawn(&mut self, command: Command, capture: bool) -> Result<u32, ProcError> {
        self.start(Recipe::of(&command, capture))
    }

    /// Starts the last command again (after a stop, a kill or an exit);
    /// kills the running child first, if any.
    pub fn respawn(&mut self) -> Result<u32, ProcError> {
        self.kill();
        let recipe = self.recipe.clone().ok_or_else(|| ProcError::Spawn {
            what: self.what.clone(),
            program: String::new(),
            source: std::io::Error::other("never started"),
        })?;
        self.start(recipe)
    }

    /// Graceful stop (see [`Supervised::stop`]), then the same command
    /// again.
    pub fn restart(&mut self, grace: Duration) -> Result<u32, ProcError> {
        self.stop(grace);
        self.respawn()
    }

    fn start(&mut self, recipe: Recipe) -> Result<u32, ProcError> {
        // A child still running is replaced, never leaked.
        self.kill();
        let mut command = recipe.command();
        command.stdin(Stdio::null());
        if recipe.capture {
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .map_err(|source| self.log_error(source))?;
            let err = log.try_clone().map_err(|source| self.log_error(source))?;
            command.stdout(log).stderr(err);
        } else {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        if self.detached {
            detach(&mut command);
        }
        self.log_start = std::fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let child = command.spawn().map_err(|source| ProcError::Spawn {
            what: self.what.clone(),
            program: recipe.program.to_string_lossy().into_owned(),
            source,
        })?;
        let pid = child.id();
        tracing::debug!(what = %self.what, pid, log = %self.log_path.display(), "started");
        self.child = Some(child);
        self.recipe = Some(recipe);
        Ok(pid)
    }

    fn log_error(&self, source: std::io::Error) -> ProcError {
        ProcError::Log {
            path: self.log_path.clone(),
            source,
        }
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

    /// [`ProcError::Exited`] if the child has exited by itself (it is then
    /// forgotten: the next check says nothing).
    pub fn exited(&mut self) -> Option<ProcError> {
        let status = self.exit_status()?;
        self.child = None;
        Some(ProcError::Exited {
            what: self.what.clone(),
            status: status.to_string(),
            log: self.log_path.clone(),
            tail: self.log_tail(),
            taken: self.taken(),
        })
    }

    /// Polls `ready` (given the child, e.g. to read this run's log) until
    /// it holds, up to `deadline`; fails early, with the log tail, when the
    /// child exits (a port taken, a bad config).
    /// `ready` is checked before the exit, and the exit once more after:
    /// a probe another program answered on a port the child could not
    /// take does not count.
    pub fn wait_ready(
        &mut self,
        deadline: Duration,
        mut ready: impl FnMut(&Supervised) -> bool,
    ) -> Result<(), ProcError> {
        let start = Instant::now();
        loop {
            let ok = ready(self);
            if let Some(error) = self.exited() {
                return Err(error);
            }
            if ok {
                return Ok(());
            }
            if start.elapsed() >= deadline {
                return Err(ProcError::NotReady {
                    what: self.what.clone(),
                    secs: deadline.as_secs(),
                    log: self.log_path.clone(),
                    tail: self.log_tail(),
                    taken: self.taken(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits up to `deadline` for the child to exit by itself (a one-shot
    /// command); kills it if it has not. `None` when killed or not running.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_for_exit(child, deadline);
        if status.is_none() {
            self.kill();
        }
        self.child = None;
        status
    }

    /// Sends `signal` (a child that already exited is fine).
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            send(child, signal);
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        send(&child, libc::SIGTERM);
        if let Some(status) = wait_for_exit(&mut child, grace) {
            return Some(status);
        }
        Some(kill(&mut child))
    }

    /// SIGTERM and up to `deadline` for the exit; `None` (and still
    /// running) if it did not exit.
    pub fn terminate_within(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        send(child, libc::SIGTERM);
        let status = wait_for_exit(child, deadline)?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL and reap: a crash at an arbitrary instant.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.child.take().map(|mut child| kill(&mut child))
    }

    /// Everything in the log so far (all runs).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// What the running (or last) child wrote to the log.
    pub fn log_of_this_run(&self) -> String {
        let log = std::fs::read(&self.log_path).unwrap_or_default();
        let from = usize::try_from(self.log_start)
            .unwrap_or(usize::MAX)
            .min(log.len());
        String::from_utf8_lossy(&log[from..]).into_owned()
    }

    /// The last [`TAIL_LINES`] lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path, TAIL_LINES)
    }

    fn taken(&self) -> Option<String> {
        crate::ports::port_taken_in(&self.log_of_this_run()).map(str::to_owned)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill();
    }
}

fn detach(command: &mut Command) {
    // SAFETY: getpid is async-signal-safe and called before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (setpgid, prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            libc::setpgid(0, 0);
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

fn send(child: &Child, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own
    // child, not yet reaped (we hold its `Child`), so it cannot be recycled.
    unsafe {
        libc::kill(pid, signal);
    }
}

fn kill(child: &mut Child) -> ExitStatus {
    send(child, libc::SIGKILL);
    loop {
        match child.wait() {
            Ok(status) => return status,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Reaped elsewhere (never here): report it as killed.
            Err(_) => return std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL),
        }
    }
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
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks the pid.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn output_is_logged_and_a_drop_kills() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Supervised::new("sh", dir.path().join("log"));
        let pid = p.spawn(sh("echo hello; exec sleep 30"), true).unwrap();
        p.wait_ready(Duration::from_secs(10), |p| p.log().contains("hello"))
            .unwrap();
        assert!(p.is_running());
        drop(p);
        assert!(!alive(pid));
    }

    #[test]
    fn an_exit_while_waiting_fails_early_and_names_a_taken_port() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Supervised::new("server", dir.path().join("log"));
        p.spawn(
            sh("echo 'listen tcp 127.0.0.1:1: bind: address already in use'; exit 1"),
            true,
        )
        .unwrap();
        let start = Instant::now();
        let error = p
            .wait_ready(Duration::from_secs(30), |_| false)
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(matches!(error, ProcError::Exited { .. }), "{error}");
        assert_eq!(
            error.port_taken().as_deref(),
            Some("server: listen tcp 127.0.0.1:1: bind: address already in use")
        );
        // A second run that does not say so is not a taken port: only
        // this run's lines count.
        p.spawn(sh("echo other; exit 1"), true).unwrap();
        let error = p
            .wait_ready(Duration::from_secs(30), |_| false)
            .unwrap_err();
        assert_eq!(error.port_taken(), None, "{error}");
    }

    #[test]
    fn not_ready_in_time_is_an_error_and_restart_runs_the_same_command() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Supervised::new("sleeper", dir.path().join("log"));
        let mut c = sh("echo run \"$X\"; exec sleep 30");
        c.env("X", "x1");
        let first = p.spawn(c, true).unwrap();
        let error = p
            .wait_ready(Duration::from_millis(100), |_| false)
            .unwrap_err();
        assert!(matches!(error, ProcError::NotReady { .. }), "{error}");
        let second = p.restart(Duration::from_secs(5)).unwrap();
        assert_ne!(first, second);
        assert!(!alive(first));
        p.wait_ready(Duration::from_secs(10), |p| {
            p.log().matches("run x1").count() == 2
        })
        .unwrap();
        assert!(p.log_of_this_run().starts_with("run x1"));
        assert!(p.stop(Duration::from_secs(5)).is_some());
        assert_eq!(p.pid(), 0);
    }

    #[test]
    fn a_one_shot_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Supervised::new("false", dir.path().join("log"));
        p.spawn(Command::new("/bin/false"), true).unwrap();
        let status = p.wait_exit(Duration::from_secs(10));
        assert_eq!(status.map(|s| s.success()), Some(false));
        p.spawn(sh("exec sleep 30"), true).unwrap();
        assert_eq!(p.wait_exit(Duration::from_millis(50)), None);
        assert!(!p.is_running());
    }
}
