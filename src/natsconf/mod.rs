//! nats-server configs for a site's leaf and for the hub's nodes, from one
//! typed description.
//!
//! The tests, the sandbox and the NixOS modules all render through here, so
//! the leaf they run is the leaf an edge host runs. A description is read
//! from a small TOML file (`presenced nats-config leaf|hub FILE`), checked
//! ([`problems`]: every mistake with its field path at once) and rendered
//! to nats-server's config syntax with a comment above each decision.
//!
//! - [`model`]: the descriptions and their defaults.
//! - [`check`]: what makes a description unusable, by field path.
//! - [`render`]: description to config text, deterministic.
//! - [`auth`]: the `authorization` block (`presenced acl`, `acl-hub`),
//!   written by the same writer.

pub mod auth;
pub mod check;
pub mod model;
pub mod render;

pub use model::{
    Cluster, HubLink, HubNode, JetStream, Leaf, LeafListen, LinkTls, Mqtt, ServerTls, SyncInterval,
};

use std::path::Path;

/// One thing wrong in a description, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Field path, e.g. `hub.urls[1]`.
    pub path: String,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Why no config was rendered.
#[derive(Debug, thiserror::Error)]
pub enum NatsConfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{origin}: {} problem(s):\n{}", .problems.len(), list(.problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, NatsConfError> {
    let text = std::fs::read_to_string(path).map_err(|source| NatsConfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| NatsConfError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn valid(origin: &str, problems: Vec<Problem>) -> Result<(), NatsConfError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(NatsConfError::Invalid {
            origin: origin.to_owned(),
            problems,
        })
    }
}

impl Leaf {
    /// Reads and checks a leaf description.
    pub fn load(path: &Path) -> Result<Leaf, NatsConfError> {
        let leaf: Leaf = load(path)?;
        valid(&path.display().to_string(), check::leaf(&leaf))?;
        Ok(leaf)
    }

    /// The config text, or every problem of the description.
    pub fn render(&self) -> Result<String, NatsConfError> {
        valid("leaf description", check::leaf(self))?;
        Ok(render::leaf(self))
    }
}

impl HubNode {
    /// Reads and checks a hub node description.
    pub fn load(path: &Path) -> Result<HubNode, NatsConfError> {
        let hub: HubNode = load(path)?;
        valid(&path.display().to_string(), check::hub(&hub))?;
        Ok(hub)
    }

    /// The config text, or every problem of the description.
    pub fn render(&self) -> Result<String, NatsConfError> {
        valid("hub node description", check::hub(self))?;
        Ok(render::hub(self))
    }
}
