//! Test support: real servers and the real daemon, on loopback ports in
//! temporary directories, torn down on `Drop`. nats-server picks its own
//! ports (port -1, read back); Mosquitto, SeaweedFS and the daemon, which
//! cannot report a port they chose, get [`free_port`]s.
//!
//! Every integration test (and the benches, through `#[path]`) includes this
//! module; each crate uses only part of it, hence the blanket
//! `dead_code` allowance.
//!
//! - [`nats`]: `nats-server` with JetStream (and optionally MQTT), its
//!   config rendered by `presenced::natsconf`, on ports it chose itself.
//! - [`hub`]: a 3-node hub cluster and a site's leaf linked to it.
//! - [`proxy`]: a loopback TCP proxy that cuts and restores a link.
//! - [`mosquitto`]: a Mosquitto broker configured as the daemon expects.
//! - [`daemon`]: the `presenced` binary under test.
//! - [`wait`]: polling with deadlines instead of sleeps.
//! - [`http`]: a tiny HTTP/1.0 client for health and monitoring endpoints.
//! - [`seaweed`]: a SeaweedFS S3 gateway that signs requests, stoppable.
//! - [`browser`]: headless Chromium over WebDriver, for the status page.
//! - [`process`]: [`process::Supervised`], the one child-process type of
//!   every wrapper above (start, graceful stop, kill, restart, log tail).
#![allow(dead_code, unused_imports)]

pub mod browser;
pub mod daemon;
pub mod http;
pub mod hub;
pub mod mosquitto;
pub mod nats;
pub mod process;
pub mod proxy;
pub mod pty;
pub mod seaweed;
pub mod wait;

pub use daemon::{presenced_bin, Daemon};
pub use http::http_get;
pub use hub::{leaf_of, Hub, LinkProxies};
pub use mosquitto::{mosquitto_bin, Mosquitto};
pub use nats::{
    check_nats_version, nats_server_bin, parse_nats_version, ClusterPorts, NatsOptions, NatsServer,
    MIN_NATS_VERSION,
};
pub use proxy::Proxy;
pub use seaweed::{weed_bin, Seaweed};
pub use wait::{wait_until, wait_until_async};

use std::net::TcpListener;

/// A free port on 127.0.0.1 for a server that cannot choose its own,
/// taken below the kernel's ephemeral range (ip_local_port_range,
/// 32768-60999 by default). Ports from inside that range are also what
/// every outgoing connection and every `port: -1` listener gets, so one
/// picked there could be taken before its server binds it (seen as a hub
/// node's route port "address already in use"). Below it, only other
/// pickers compete: the start is random per call and the port is checked
/// free by binding it.
pub fn free_port() -> u16 {
    use rand::Rng as _;
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_767;
    let span = u32::from(HIGH - LOW) + 1;
    let start = rand::thread_rng().gen_range(0..span);
    for i in 0..span {
        let port = LOW + ((start + i) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for a free port");
    listener
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}
