//! Small loopback probes: HTTP status of monitoring and health endpoints,
//! the leafnode links a server has.

use std::net::SocketAddr;

pub use presenced_procs::http::{http_get, http_status};

/// How many leafnode links the server at monitoring address `addr` has
/// (`/leafz`), 0 when unknown.
pub fn leafnode_links(addr: SocketAddr) -> u64 {
    http_get(addr, "/leafz")
        .filter(|(s, _)| *s == 200)
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|v| v.get("leafnodes").and_then(|n| n.as_u64()))
        .unwrap_or(0)
}

/// The pid that `/healthz` at `addr` says answered, when it answered 200.
pub fn healthy_pid(addr: SocketAddr) -> Option<u32> {
    http_get(addr, "/healthz")
        .filter(|(s, _)| *s == 200)
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|v| v.get("pid").and_then(|n| n.as_u64()))
        .and_then(|pid| u32::try_from(pid).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_listening_gives_none() {
        let port = presenced_procs::free_port();
        assert_eq!(
            http_status(SocketAddr::from(([127, 0, 0, 1], port)), "/"),
            None
        );
        assert_eq!(leafnode_links(SocketAddr::from(([127, 0, 0, 1], port))), 0);
        assert_eq!(healthy_pid(SocketAddr::from(([127, 0, 0, 1], port))), None);
    }
}
