//! Supervised server processes on loopback ports, shared by the
//! `presenced sandbox` (which ships in the binary), the integration tests
//! and the benches, so that starting, waiting for, stopping and restarting
//! nats-server, Mosquitto, SeaweedFS and the daemon is written once.
//!
//! - [`Supervised`]: one child process with its log, a readiness wait with
//!   a deadline that fails early when the child exits, graceful stop, kill,
//!   restart, and kill on `Drop`.
//! - [`ports`]: ports for servers that cannot pick their own, and starting
//!   again on fresh ones when a port picked was taken before the server
//!   bound it (nats-server picks its own where it can: `-1`).
//! - [`http`]: a tiny HTTP/1.0 client for health and monitoring endpoints.

pub mod child;
pub mod http;
pub mod ports;

pub use child::{log_tail, read_log, ProcError, Supervised, TAIL_LINES};
pub use http::{http_get, http_status};
pub use ports::{free_port, free_ports, port_taken_in, retry_on_taken_port};

use std::path::{Path, PathBuf};

/// Finds an executable called `name` on `PATH` (servers are found the same
/// way by the sandbox and by the tests: `$NATS_SERVER`, `$WEED`, ... first,
/// then this).
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a file someone may execute.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
