//! Test support: real servers and the real daemon, on loopback ports in
//! temporary directories, torn down on `Drop`. nats-server picks its own
//! ports (port -1, read back); Mosquitto, SeaweedFS and the daemon, which
//! cannot report a port they chose, get [`free_port`]s (and Mosquitto and
//! SeaweedFS start again on fresh ones when one was taken first).
//!
//! Every integration test (and the benches, through `#[path]`) includes this
//! module; each crate uses only part of it, hence the blanket
//! `dead_code` allowance.
//!
//! - [`nats`]: `nats-server` with JetStream (and optionally MQTT), its
//!   config rendered by `presenced::natsconf`, on ports it chose itself.
//! - [`acl_site`]: a site under the ACL `presenced acl` generates (seeds,
//!   access file, leaf, provisioned by the admin).
//! - [`hub`]: a 3-node hub cluster and a site's leaf linked to it.
//! - [`proxy`]: a loopback TCP proxy that cuts and restores a link.
//! - [`mosquitto`]: a Mosquitto broker configured as the daemon expects.
//! - [`daemon`]: the `presenced` binary under test.
//! - [`wait`]: polling with deadlines instead of sleeps.
//! - [`http`]: a tiny HTTP/1.0 client for health and monitoring endpoints.
//! - [`seaweed`]: a SeaweedFS S3 gateway that signs requests, stoppable.
//! - [`browser`]: headless Chromium over WebDriver, for the status page.
//! - [`process`]: [`process::Supervised`] from the `presenced-procs` crate
//!   (shared with the sandbox), the one child-process type of every
//!   wrapper above (start, readiness wait, stop, kill, restart, log tail).
#![allow(dead_code, unused_imports)]

pub mod acl_site;
pub mod audit;
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

pub use acl_site::AclSite;
pub use daemon::{presenced_bin, Daemon};
pub use http::http_get;
pub use hub::{leaf_of, leaf_of_as, Hub, LinkProxies};
pub use mosquitto::{mosquitto_bin, Mosquitto};
pub use nats::{
    check_nats_version, nats_server_bin, parse_nats_version, ClusterPorts, NatsOptions, NatsServer,
    MIN_NATS_VERSION,
};
pub use proxy::Proxy;
pub use seaweed::{weed_bin, Seaweed};
pub use wait::{wait_until, wait_until_async};

/// A free port on 127.0.0.1 for a server that cannot choose its own,
/// below the kernel's ephemeral range (see [`presenced_procs::ports`]).
pub use presenced_procs::free_port;
