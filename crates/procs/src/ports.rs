//! Ports for servers that cannot choose their own, and starting again on
//! fresh ones when a port picked was taken before its server bound it.
//!
//! Mosquitto, SeaweedFS and the daemon cannot listen on port 0 and report
//! the port, and a JetStream cluster needs its route ports before any node
//! starts; so a port is picked free, released, and handed to the server.
//! Another program can take it in between. Picking below the kernel's
//! ephemeral range makes that rare (only other pickers compete there, not
//! every outgoing connection); [`retry_on_taken_port`] makes it harmless.

use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;

/// The range picked from: below the kernel's ephemeral range
/// (`ip_local_port_range`, 32768-60999 by default), from which every
/// outgoing connection and every `port: -1` listener takes its port.
pub const PICK_RANGE: std::ops::RangeInclusive<u16> = 20_000..=32_767;

/// Starts a server gets before a taken port is an error.
pub const START_ATTEMPTS: usize = 3;

/// A random number without a dependency: the standard library seeds each
/// `RandomState` from the OS.
fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(u64::from(std::process::id()));
    hasher.finish()
}

/// `n` distinct free ports on 127.0.0.1 from [`PICK_RANGE`]: each checked
/// free by binding it, all held until the last is found (so none repeats),
/// free again when this returns. The start is random per call, so
/// concurrent pickers (parallel tests) rarely meet.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let (low, high) = (*PICK_RANGE.start(), *PICK_RANGE.end());
    let span = u64::from(high - low) + 1;
    let start = random() % span;
    let mut held = Vec::with_capacity(n);
    for i in 0..span {
        if held.len() == n {
            break;
        }
        // Both in range by construction: `(start + i) % span < span`.
        let port = low + ((start + i) % span) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    // The range is exhausted (never seen): let the kernel pick the rest.
    while held.len() < n {
        held.push(TcpListener::bind("127.0.0.1:0")?);
    }
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// One free port (see [`free_ports`]); panics if the machine has no free
/// loopback port at all, which no test or sandbox could survive anyway.
pub fn free_port() -> u16 {
    free_ports(1)
        .ok()
        .and_then(|ports| ports.first().copied())
        .unwrap_or_else(|| panic!("no free port on 127.0.0.1"))
}

/// The line of a server's log that says a port it was to listen on was
/// taken, in the words of Go servers (nats-server, SeaweedFS: `bind:
/// address already in use`), C servers (Mosquitto: `Error: Address already
/// in use`) and Rust (`Address already in use (os error 98)`).
pub fn port_taken_in(log: &str) -> Option<&str> {
    log.lines()
        .find(|l| l.to_ascii_lowercase().contains("address already in use"))
        .map(str::trim)
}

/// Runs `start(attempt)` (from 1) until it succeeds, fails for another
/// reason than a taken port, or has failed [`START_ATTEMPTS`] times.
/// `taken` says whether an error was a taken port (and why, for the
/// message); `start` picks its ports itself, fresh on every attempt, and
/// must leave nothing running when it fails. `retrying` hears each retry.
pub fn retry_on_taken_port<T, E>(
    mut start: impl FnMut(usize) -> Result<T, E>,
    taken: impl Fn(&E) -> Option<String>,
    mut retrying: impl FnMut(usize, &str),
) -> Result<T, E> {
    let mut attempt = 1;
    loop {
        match start(attempt) {
            Ok(value) => return Ok(value),
            Err(error) => match taken(&error) {
                Some(why) if attempt < START_ATTEMPTS => {
                    tracing::info!(
                        attempt,
                        why,
                        "a port was taken; starting again on fresh ports"
                    );
                    retrying(attempt, &why);
                    attempt += 1;
                }
                _ => return Err(error),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports = free_ports(20).unwrap();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 20);
        for p in ports {
            assert!(PICK_RANGE.contains(&p), "{p}");
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }

    #[test]
    fn the_wordings_of_a_taken_port_are_recognised() {
        for line in [
            "F1207 s3.go:434 S3 API Server listener on 127.0.0.1:37497 error: listen tcp 127.0.0.1:37497: bind: address already in use",
            "1796624607: Error: Address already in use",
            "[FTL] Error listening on leafnode port: 7422 - listen tcp 127.0.0.1:7422: bind: address already in use",
            "Error: Address already in use (os error 98)",
        ] {
            let log = format!("starting\n{line}\nexiting\n");
            assert_eq!(port_taken_in(&log), Some(line));
        }
        assert_eq!(port_taken_in("Error: permission denied\n"), None);
    }

    #[test]
    fn a_taken_port_is_retried_and_other_errors_are_not() {
        let mut retries = Vec::new();
        let got = retry_on_taken_port(
            |attempt| {
                if attempt < 3 {
                    Err("bind: address already in use")
                } else {
                    Ok(attempt)
                }
            },
            |e| port_taken_in(e).map(str::to_owned),
            |attempt, _| retries.push(attempt),
        );
        assert_eq!(got, Ok(3));
        assert_eq!(retries, [1, 2]);
        let mut calls = 0;
        let got: Result<(), &str> = retry_on_taken_port(
            |_| {
                calls += 1;
                Err("no such file")
            },
            |e| port_taken_in(e).map(str::to_owned),
            |_, _| {},
        );
        assert_eq!((got, calls), (Err("no such file"), 1));
        let got: Result<(), &str> = retry_on_taken_port(
            |_| Err("address already in use"),
            |e| port_taken_in(e).map(str::to_owned),
            |_, _| {},
        );
        assert_eq!(
            got,
            Err("address already in use"),
            "gives up after {START_ATTEMPTS}"
        );
    }
}
