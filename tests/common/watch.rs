//! `presenced watch` as a subprocess whose output lines are collected, each
//! with the instant it was read.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

pub type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// A running `presenced watch`; killed on drop.
pub struct Watch {
    pub lines: Lines,
    child: tokio::process::Child,
    reader: tokio::task::JoinHandle<()>,
    stderr: Lines,
}

impl Watch {
    /// Runs `presenced watch --config <config> <args...>`.
    pub fn start(config: &Path, args: &[&str]) -> Watch {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_presenced"))
            .arg("watch")
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "presenced=debug,warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start presenced watch");
        let lines: Lines = Arc::default();
        let stderr: Lines = Arc::default();
        let out = child.stdout.take().expect("watch stdout");
        let err = child.stderr.take().expect("watch stderr");
        let l = lines.clone();
        let e = stderr.clone();
        let reader = tokio::spawn(async move {
            let mut out = tokio::io::BufReader::new(out).lines();
            let mut err = tokio::io::BufReader::new(err).lines();
            let mut err_open = true;
            loop {
                tokio::select! {
                    line = out.next_line() => match line {
                        Ok(Some(line)) => l.lock().unwrap().push((Instant::now(), line)),
                        _ => return,
                    },
                    line = err.next_line(), if err_open => match line {
                        Ok(Some(line)) => e.lock().unwrap().push((Instant::now(), line)),
                        _ => err_open = false,
                    },
                }
            }
        });
        Watch {
            lines,
            child,
            reader,
            stderr,
        }
    }

    /// Every stdout line so far.
    pub fn text(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Every stdout line so far parsed as JSON, with the instant it was read.
    pub fn json(&self) -> Vec<(Instant, serde_json::Value)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(t, l)| {
                let v = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("watch printed a non-JSON line {l:?}: {e}"));
                (*t, v)
            })
            .collect()
    }

    /// What the watch wrote to stderr (debug log included).
    pub fn stderr(&self) -> String {
        let lines = self.stderr.lock().unwrap();
        let from = lines.len().saturating_sub(60);
        lines[from..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until a JSON line satisfies `f`; returns it and when it came.
    pub async fn wait_json(
        &self,
        what: &str,
        deadline: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> (Instant, serde_json::Value) {
        self.wait_json_from(0, what, deadline, f).await
    }

    /// [`Watch::wait_json`] among the lines from index `from` on.
    pub async fn wait_json_from(
        &self,
        from: usize,
        what: &str,
        deadline: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> (Instant, serde_json::Value) {
        let start = Instant::now();
        loop {
            if let Some(hit) = self.json().into_iter().skip(from).find(|(_, v)| f(v)) {
                return hit;
            }
            assert!(
                start.elapsed() < deadline,
                "watch printed no line where {what} within {deadline:?}; stdout:\n{}\nstderr:\n{}",
                self.text().join("\n"),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        self.reader.abort();
    }
}
