//! systemd notify protocol with the real binary: READY only once the
//! daemon is ready, WATCHDOG pings while it runs, STATUS lines, and
//! STOPPING plus a clean exit on SIGTERM. A Unix datagram socket stands in
//! for systemd's NOTIFY_SOCKET.

use crate::common;
use crate::support;

use common::*;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

fn recv_all(
    sock: &UnixDatagram,
    until: Instant,
    mut stop: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < until && !stop(&got) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[test]
fn notifies_ready_watchdog_status_and_stopping() {
    let nats = NatsServer::start(NatsOptions::default());
    let mqtt = Mosquitto::start();
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("presenced.toml");
    let zones =
        "[zones.hall]\n[[zones.hall.evidence]]\nsensor = \"hall\"\np_true = 0.9\np_false = 0.1\n";
    std::fs::write(
        &cfg_path,
        daemon_config(
            "test",
            &nats.url(),
            mqtt.port,
            http_port,
            &motion_mapping(false),
            zones,
        ),
    )
    .unwrap();
    provision(&cfg_path);

    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let sock_env = sock_path.to_str().unwrap().to_owned();
    let mut d = Daemon::start_at(
        &cfg_path,
        &[("NOTIFY_SOCKET", &sock_env), ("WATCHDOG_USEC", "400000")],
    );

    let msgs = recv_all(&sock, Instant::now() + Duration::from_secs(20), |m| {
        m.iter().any(|s| s.contains("READY=1"))
    });
    let ready = msgs
        .iter()
        .find(|s| s.contains("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {msgs:?}; log:\n{}", d.log()));
    assert!(
        ready.contains("STATUS="),
        "READY comes with a status line: {ready}"
    );
    // READY is sent only once the daemon says it is ready.
    assert_eq!(support::http_get(http, "/healthz").map(|r| r.0), Some(200));

    // Watchdog pings keep coming at about half the interval, and a status
    // line every few seconds.
    let later = recv_all(&sock, Instant::now() + Duration::from_secs(6), |_| false);
    let pings = later.iter().filter(|s| s.contains("WATCHDOG=1")).count();
    assert!(
        pings >= 6,
        "expected ~30 watchdog pings in 6 s at 400 ms, got {pings}: {later:?}"
    );
    assert!(
        later
            .iter()
            .any(|s| s.starts_with("STATUS=") && s.contains("zones")),
        "{later:?}"
    );

    let status = d.terminate();
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status:?}\n{}",
        d.log()
    );
    let end = recv_all(&sock, Instant::now() + Duration::from_secs(2), |m| {
        m.iter().any(|s| s.contains("STOPPING=1"))
    });
    assert!(
        end.iter().any(|s| s.contains("STOPPING=1")),
        "STOPPING=1 on SIGTERM: {end:?}"
    );
    assert!(d.log().contains("stopped cleanly"), "{}", d.log());
}
