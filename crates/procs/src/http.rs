//! A tiny HTTP/1.0 client on `std::net`: enough for health and monitoring
//! endpoints and readiness probes, without an HTTP client dependency.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET path` on `addr`: the status code and body, or `None` if nothing
/// answered or the answer is not HTTP. A port that accepts connections but
/// never answers (another program holding it) gives `None`, which is why
/// readiness probes use this rather than a bare TCP connect.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    parse_response(&String::from_utf8_lossy(&raw))
}

/// The status code of `GET path`, if anything answered.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).map(|(status, _)| status)
}

/// Splits a raw HTTP/1.x response into status code and body.
pub fn parse_response(raw: &str) -> Option<(u16, String)> {
    let status_line = raw.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_split_into_status_and_body() {
        assert_eq!(
            parse_response("HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\n{\"x\":1}"),
            Some((503, "{\"x\":1}".to_owned()))
        );
        assert_eq!(parse_response("SSH-2.0-OpenSSH\r\n"), None);
    }

    #[test]
    fn a_port_held_without_answering_is_not_an_http_server() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        assert_eq!(http_get(addr, "/"), None);
    }
}
