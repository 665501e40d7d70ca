//! Small loopback probes: free ports, HTTP status of monitoring and health
//! endpoints, the leafnode links a server has.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// `n` distinct ports the kernel just handed out on 127.0.0.1. All are held
/// until the last is taken, so none repeats; they are free again when this
/// returns, and the servers started right after will almost surely get them.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// `GET path` over HTTP/1.0: status and body, or None if nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).map(|(s, _)| s)
}

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
    fn free_ports_are_distinct() {
        let mut p = free_ports(20).unwrap();
        p.sort_unstable();
        p.dedup();
        assert_eq!(p.len(), 20);
    }

    #[test]
    fn nothing_listening_gives_none() {
        let port = free_ports(1).unwrap()[0];
        assert_eq!(
            http_status(SocketAddr::from(([127, 0, 0, 1], port)), "/"),
            None
        );
        assert_eq!(leafnode_links(SocketAddr::from(([127, 0, 0, 1], port))), 0);
    }
}
