//! The `[http]` section: where `/healthz`, `/metrics` and the status
//! page are served.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The HTTP listener (`[http]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve `/healthz` and `/metrics`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Loopback by default: metrics are not for the open network.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Let the status page at `/` send overrides (the same command as
    /// `presenced cmd`). Off by default: a listener opened to a network
    /// would otherwise hand it the zones. Also needs this identity to be
    /// granted `commands` (docs/OPERATIONS.md "Status page").
    #[serde(default)]
    pub page_commands: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: default_http_listen(),
            page_commands: false,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
