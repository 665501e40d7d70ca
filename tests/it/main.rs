//! The integration tests, as one test binary. Each module was once its own
//! file under `tests/` and so its own binary: every one of them compiled the
//! harness (`tests/support/`) and the shared helpers (`tests/common/`) again
//! and linked the whole crate again. One binary builds them once.
//!
//! nextest still runs every test in its own process, so tests that set
//! environment variables or hold global state stay alone. A test's name is
//! its module path (`faults::row_1_...`); run one area with
//! `cargo nextest run --test it acl::`. `.config/nextest.toml` keeps the
//! heavy areas (3-node hubs, the fault campaign, the sandbox, the real Home
//! Assistant) from running at the same time.

// The harness and the helpers stay beside this directory: the benches
// include the harness by path too.
#[path = "../common/mod.rs"]
mod common;
#[path = "../support/mod.rs"]
mod support;

mod acl;
mod acl_daemon;
mod acl_hub;
mod archive;
mod bad_input;
mod cli;
mod commands;
mod daemon;
mod espresense;
mod examples;
mod failover;
mod faults;
mod harness;
mod homeassistant;
mod homeassistant_real;
mod hostname;
mod hub;
mod ingest;
mod layout;
mod leases;
mod lifecycle;
mod metrics;
mod mqtt_source;
mod natsconf;
mod page;
mod pipeline;
mod redteam;
mod replay;
mod sandbox;
mod serial;
mod split;
mod standby;
mod supervise;
mod systemd;
mod tls;
mod tune;
mod watch;
mod watch_hub;
