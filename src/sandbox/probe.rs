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
    }
}
