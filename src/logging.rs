//! The `[log]` section and the tracing subscriber the binary installs
//! from it.

use crate::base::problems::Problems;
use serde::{Deserialize, Serialize};
use std::io::IsTerminal as _;

/// Logging (`[log]`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter
    /// directive; `RUST_LOG` wins when set.
    pub level: Option<String>,
}

/// Checks `[log]`, pushing every problem found.
pub fn check(log: &LogConfig, p: &mut Problems) {
    if let Some(level) = &log.level {
        if level.trim().is_empty() {
            p.push(
                "log.level",
                "is empty: leave it out for the default, or say e.g. `info`",
            );
        } else if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
            p.push(
                "log.level",
                format!("{level:?} is not a tracing filter directive (e.g. `info` or `presenced=debug,info`): {e}"),
            );
        }
    }
}

/// Installs the process's tracing subscriber on stderr: `RUST_LOG` when
/// set (and valid), else `level` (a command's own, or `log.level`), else
/// `info`.
pub fn init(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| level.and_then(|l| EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"));
    // journald adds its own timestamps and does not render ANSI colours.
    let tty = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(tty)
        .with_writer(std::io::stderr)
        .init();
}
